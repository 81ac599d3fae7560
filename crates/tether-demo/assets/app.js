// The shared editor of /docs/{id}: keeps the textarea in step with the server's copy of the
// document over the transport picked on the page (WebSocket, SSE + POST, long-poll + POST).
//
// Merging is operational transformation, as in ot.js: at most one edit is in flight (sent, not
// yet seen back from the server); later local edits wait, composed into one buffered edit.
// Edits of others are transformed past both before they touch the textarea.

import * as ot from './ot.js';

const $ = (id) => document.getElementById(id);
const editor = $('editor');
const [, prefix, docId] = location.pathname.match(/^(.*)\/docs\/([A-Za-z0-9_-]{1,64})\/?$/) || [];
const params = new URLSearchParams(location.search);
const TRANSPORTS = { ws: 'WebSocket', sse: 'SSE + POST', poll: 'Long-poll + POST' };
const transportName = params.get('transport') in TRANSPORTS ? params.get('transport') : 'ws';
const clientId = Math.random().toString(36).slice(2, 12) + Date.now().toString(36);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The client's copy of the document and the OT state around it. */
class Session {
  constructor() {
    this.text = '';
    this.rev = 0;
    this.server = null; // the server whose revisions `rev` counts; null = need a fresh copy
    this.viewers = null;
    this.outstanding = null; // sent, not yet acknowledged
    this.outstandingSeq = 0;
    this.buffer = null; // typed while `outstanding` was in flight
    this.seeding = false; // `outstanding` carries our whole text to a server new to the document
    this.seq = 0;
    this.epoch = 0; // counts hellos, so an answer to an edit sent before one can be ignored
    this.retryMs = 250;
    this.reconnecting = false;
    this.transport = new { ws: WsTransport, sse: SseTransport, poll: PollTransport }[transportName](this);
  }

  /** Query of a (re)connect: who we are and, if we have a copy, what we have. */
  connectQuery() {
    const q = new URLSearchParams({ client: clientId });
    if (this.server !== null) {
      q.set('since', this.rev);
      q.set('server', this.server);
    }
    return q;
  }

  start() {
    show('state', 'connecting');
    this.transport.connect(this.connectQuery());
  }

  receive(message) {
    switch (message.type) {
      case 'hello':
        return this.onHello(message);
      case 'op':
        return this.onOp(message);
      case 'viewers':
        return this.setViewers(message.count);
      case 'error':
        return this.resync(message.message);
    }
  }

  onHello(hello) {
    const moved = this.server !== null && hello.server !== this.server;
    if (moved && hello.rev === 0 && hello.text === '' && this.text !== '') {
      // Tether moved us to a server that has never seen this document: bring our copy.
      note(`Moved from ${this.server} to ${hello.server}: carried the text over.`);
      this.rev = 0;
      this.buffer = null;
      this.outstanding = [this.text];
      this.outstandingSeq = ++this.seq;
      this.seeding = true;
      this.sendOutstanding();
    } else if ('text' in hello) {
      if (this.outstanding || this.buffer) note('Unsaved edits were dropped: this server has another copy.');
      else if (moved) note(`Moved from ${this.server} to ${hello.server}.`);
      this.outstanding = this.buffer = null;
      this.seeding = false;
      this.rev = hello.rev;
      this.replaceText(hello.text);
    } else {
      for (const op of hello.missed) this.onOp(op);
      // Not acknowledged in what we missed: it never arrived. Send it again (the server
      // ignores a repeat of an edit it has already applied).
      if (this.outstanding) this.sendOutstanding();
    }
    this.server = hello.server;
    this.epoch++;
    this.retryMs = 250;
    this.reconnecting = false;
    editor.readOnly = false;
    show('live-server', hello.server);
    this.setViewers(hello.viewers);
    show('state', 'live');
  }

  onOp(message) {
    if (message.rev <= this.rev) return; // already have it
    if (message.rev !== this.rev + 1) return this.resync('missed an edit');
    // Someone else carried the document over first: our seed will be refused; take theirs.
    if (this.seeding && message.client !== clientId) return this.resync('another copy arrived first');
    this.rev = message.rev;
    if (message.client === clientId && this.outstanding && message.seq === this.outstandingSeq) {
      this.seeding = false;
      this.outstanding = this.buffer;
      this.buffer = null;
      if (this.outstanding) {
        this.outstandingSeq = ++this.seq;
        this.sendOutstanding();
      }
      return;
    }
    let op = message.op;
    if (this.outstanding) [this.outstanding, op] = ot.transform(this.outstanding, op);
    if (this.buffer) [this.buffer, op] = ot.transform(this.buffer, op);
    this.applyRemote(op);
  }

  /** The textarea changed: turn that into an edit and send it, or buffer it. */
  onInput() {
    const value = editor.value;
    const caret = ot.len(value.slice(0, editor.selectionEnd));
    const op = ot.fromDiff(this.text, value, caret);
    this.text = value;
    if (ot.isNoop(op)) return;
    if (this.outstanding === null) {
      this.outstanding = op;
      this.outstandingSeq = ++this.seq;
      this.sendOutstanding();
    } else {
      this.buffer = this.buffer ? ot.compose(this.buffer, op) : op;
    }
  }

  sendOutstanding() {
    const edit = { rev: this.rev, seq: this.outstandingSeq, op: this.outstanding };
    if (this.seeding) edit.seed = true;
    this.transport.send(edit);
  }

  applyRemote(op) {
    const [start, end] = [editor.selectionStart, editor.selectionEnd].map((i) =>
      ot.transformIndex(op, ot.len(this.text.slice(0, i))),
    );
    const text = ot.apply(op, this.text);
    this.text = text;
    editor.value = text;
    const chars = ot.chars(text);
    const at = (i) => chars.slice(0, i).join('').length; // back to UTF-16 offsets
    if (document.activeElement === editor) editor.setSelectionRange(at(start), at(end));
  }

  replaceText(text) {
    this.text = text;
    editor.value = text;
  }

  setViewers(count) {
    this.viewers = count;
    show('viewers', count);
  }

  /** The connection broke: reconnect with what we have, after a growing pause. */
  disconnected() {
    if (this.reconnecting) return;
    this.reconnecting = true;
    // Typing now could be lost if the next server has another copy: wait for its hello.
    editor.readOnly = true;
    this.transport.close();
    show('state', 'reconnecting');
    const wait = this.retryMs;
    this.retryMs = Math.min(this.retryMs * 2, 5000);
    setTimeout(() => this.transport.connect(this.connectQuery()), wait);
  }

  /** Our copy cannot be trusted: start over from the server's. */
  resync(why) {
    note(`Reloaded the document (${why}).`);
    this.server = null;
    this.disconnected();
  }
}

/** Sends an edit by POST (SSE and long-poll). */
async function postEdit(session, edit) {
  const epoch = session.epoch;
  let response;
  try {
    response = await fetch(`${prefix}/docs/${docId}/ops?client=${clientId}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(edit),
    });
  } catch {
    return session.disconnected();
  }
  if (epoch !== session.epoch) return; // about a copy we have already left behind
  if (response.status === 409 || response.status === 400) {
    const body = await response.json().catch(() => ({}));
    session.resync(body.error || 'edit refused');
  } else if (!response.ok) {
    session.disconnected();
  }
}

class WsTransport {
  constructor(session) {
    this.session = session;
  }

  connect(query) {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${scheme}//${location.host}${prefix}/docs/${docId}/ws?${query}`);
    ws.onmessage = (event) => this.session.receive(JSON.parse(event.data));
    ws.onclose = () => this.ws === ws && this.session.disconnected();
    this.ws = ws;
  }

  send(edit) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(edit));
  }

  close() {
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close();
  }
}

class SseTransport {
  constructor(session) {
    this.session = session;
  }

  connect(query) {
    // Reconnecting is ours to do (with `since`), not EventSource's (it would reuse the old URL).
    const events = new EventSource(`${prefix}/docs/${docId}/events?${query}`);
    events.onmessage = (event) => this.session.receive(JSON.parse(event.data));
    events.onerror = () => this.events === events && this.session.disconnected();
    this.events = events;
  }

  send(edit) {
    postEdit(this.session, edit);
  }

  close() {
    const events = this.events;
    this.events = null;
    if (events) events.close();
  }
}

class PollTransport {
  constructor(session) {
    this.session = session;
    this.generation = 0;
  }

  async connect(query) {
    const generation = ++this.generation;
    query.set('hello', '1');
    while (generation === this.generation) {
      let messages;
      try {
        const response = await fetch(`${prefix}/poll/docs/${docId}?${query}`);
        if (!response.ok) throw new Error(`poll: ${response.status}`);
        messages = await response.json();
      } catch {
        if (generation === this.generation) this.session.disconnected();
        return;
      }
      if (generation !== this.generation) return;
      const askedHello = query.get('hello') === '1';
      for (const message of messages) this.session.receive(message);
      // A hello we did not ask for: another server answered (the unpinned route). Don't spin.
      if (!askedHello && messages.some((m) => m.type === 'hello')) await sleep(1000);
      query = new URLSearchParams({
        client: clientId,
        since: this.session.rev,
        server: this.session.server,
        viewers: this.session.viewers,
      });
    }
  }

  send(edit) {
    postEdit(this.session, edit);
  }

  close() {
    this.generation++;
  }
}

function show(id, value) {
  $(id).textContent = value;
  document.body.dataset[id.replace(/-(.)/g, (_, c) => c.toUpperCase())] = value;
}

function note(text) {
  $('note').textContent = text;
}

function setUpPage() {
  const unpinned = prefix === '/unpinned';
  document.body.classList.toggle('unpinned', unpinned);
  $('doc-name').textContent = docId;
  const select = $('transport');
  select.value = transportName;
  select.onchange = () => {
    location.search = `?transport=${select.value}`;
  };
  const other = $('other-route');
  other.href = `${unpinned ? '' : '/unpinned'}/docs/${docId}${location.search}`;
  other.textContent = unpinned ? 'Back to the pinned route' : 'Try it unpinned (round robin)';
  $('share').textContent = location.href;
}

if (docId) {
  setUpPage();
  const session = new Session();
  editor.addEventListener('input', () => session.onInput());
  session.start();
  window.tetherDemo = session; // for a curious console, and for tests
}
