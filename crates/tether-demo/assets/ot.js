// Operational transformation of plain text: the scheme of ot.js, and of the server's ot.rs.
//
// An operation is an array that walks the whole text: a number n > 0 keeps n characters, a
// number n < 0 deletes -n characters, a string inserts itself. Lengths count code points, as
// the server counts Rust chars. Operations are kept canonical (no empty or mergeable
// neighbours, an insert before an adjacent delete), as the server builds them.

/** The code points of `s`. */
export const chars = (s) => Array.from(s);

/** The length of `s` in code points. */
export const len = (s) => {
  let n = 0;
  for (const _ of s) n++;
  return n;
};

const isRetain = (c) => typeof c === 'number' && c > 0;
const isDelete = (c) => typeof c === 'number' && c < 0;
const isInsert = (c) => typeof c === 'string';

/** Builds a canonical operation step by step. */
export class Builder {
  constructor() {
    this.ops = [];
  }

  retain(n) {
    if (n <= 0) return this;
    const last = this.ops.length - 1;
    if (isRetain(this.ops[last])) this.ops[last] += n;
    else this.ops.push(n);
    return this;
  }

  insert(s) {
    if (s === '') return this;
    const ops = this.ops;
    const last = ops.length - 1;
    if (isInsert(ops[last])) ops[last] += s;
    else if (isDelete(ops[last]) && isInsert(ops[last - 1])) ops[last - 1] += s;
    else if (isDelete(ops[last])) ops.splice(last, 0, s);
    else ops.push(s);
    return this;
  }

  delete(n) {
    if (n <= 0) return this;
    const last = this.ops.length - 1;
    if (isDelete(this.ops[last])) this.ops[last] -= n;
    else this.ops.push(-n);
    return this;
  }
}

/** The length of the text `op` applies to. */
export function baseLen(op) {
  return op.reduce((n, c) => (isInsert(c) ? n : n + Math.abs(c)), 0);
}

/** The length of the text `op` produces. */
export function targetLen(op) {
  return op.reduce((n, c) => (isInsert(c) ? n + len(c) : isRetain(c) ? n + c : n), 0);
}

/** True if `op` changes nothing. */
export const isNoop = (op) => op.every(isRetain);

/** Applies `op` to `text`. */
export function apply(op, text) {
  const cs = chars(text);
  if (cs.length !== baseLen(op)) {
    throw new Error(`apply: operation is for ${baseLen(op)} characters, text has ${cs.length}`);
  }
  let out = '';
  let i = 0;
  for (const c of op) {
    if (isRetain(c)) {
      out += cs.slice(i, i + c).join('');
      i += c;
    } else if (isInsert(c)) {
      out += c;
    } else {
      i -= c;
    }
  }
  return out;
}

/**
 * Given `a` and `b` made on the same text, returns `[a2, b2]` such that applying `a` then `b2`
 * equals applying `b` then `a2`. At one position, `a`'s insert comes first.
 */
export function transform(a, b) {
  const a2 = new Builder();
  const b2 = new Builder();
  let i1 = 0;
  let i2 = 0;
  let op1 = a[i1++];
  let op2 = b[i2++];
  while (op1 !== undefined || op2 !== undefined) {
    if (isInsert(op1)) {
      a2.insert(op1);
      b2.retain(len(op1));
      op1 = a[i1++];
      continue;
    }
    if (isInsert(op2)) {
      a2.retain(len(op2));
      b2.insert(op2);
      op2 = b[i2++];
      continue;
    }
    if (op1 === undefined || op2 === undefined) {
      throw new Error('transform: operations for texts of different lengths');
    }
    const n1 = Math.abs(op1);
    const n2 = Math.abs(op2);
    const n = Math.min(n1, n2);
    if (isRetain(op1) && isRetain(op2)) {
      a2.retain(n);
      b2.retain(n);
    } else if (isDelete(op1) && isRetain(op2)) {
      a2.delete(n);
    } else if (isRetain(op1) && isDelete(op2)) {
      b2.delete(n);
    } // both deleted the same characters: nothing left to do
    op1 = n1 > n ? Math.sign(op1) * (n1 - n) : a[i1++];
    op2 = n2 > n ? Math.sign(op2) * (n2 - n) : b[i2++];
  }
  return [a2.ops, b2.ops];
}

/** One operation with the effect of `a` then `b`. */
export function compose(a, b) {
  if (targetLen(a) !== baseLen(b)) throw new Error('compose: lengths do not line up');
  const out = new Builder();
  let i1 = 0;
  let i2 = 0;
  let op1 = a[i1++];
  let op2 = b[i2++];
  while (op1 !== undefined || op2 !== undefined) {
    if (isDelete(op1)) {
      out.delete(-op1);
      op1 = a[i1++];
      continue;
    }
    if (isInsert(op2)) {
      out.insert(op2);
      op2 = b[i2++];
      continue;
    }
    if (op1 === undefined || op2 === undefined) throw new Error('compose: lengths do not line up');
    // op1 is a retain or an insert (of text b can keep or delete); op2 a retain or a delete.
    const n1 = isInsert(op1) ? len(op1) : op1;
    const n2 = Math.abs(op2);
    const n = Math.min(n1, n2);
    if (isRetain(op2)) {
      if (isInsert(op1)) out.insert(chars(op1).slice(0, n).join(''));
      else out.retain(n);
    } else if (isRetain(op1)) {
      out.delete(n);
    } // an insert that b deletes again: nothing at all
    op1 = n1 > n ? (isInsert(op1) ? chars(op1).slice(n).join('') : op1 - n) : a[i1++];
    op2 = n2 > n ? Math.sign(op2) * (n2 - n) : b[i2++];
  }
  return out.ops;
}

/**
 * The operation that turns `before` into `after`, one replaced range. `caret` (code points in
 * `after`; 0 = no hint) is where the change ended, so typing "a" into "aa" at the start is an
 * insert at 0, not at the end.
 */
export function fromDiff(before, after, caret = 0) {
  const a = chars(before);
  const b = chars(after);
  const suffixLimit = Math.max(0, Math.min(a.length, b.length - Math.min(caret, b.length)));
  let s = 0;
  while (s < suffixLimit && a[a.length - 1 - s] === b[b.length - 1 - s]) s++;
  let p = 0;
  while (p < a.length - s && p < b.length - s && a[p] === b[p]) p++;
  return new Builder()
    .retain(p)
    .delete(a.length - p - s)
    .insert(b.slice(p, b.length - s).join(''))
    .retain(s).ops;
}

/** Where position `index` (code points) of the old text is after `op`; inserts at it push it on. */
export function transformIndex(op, index) {
  let pos = 0;
  let moved = index;
  for (const c of op) {
    if (pos > index) break;
    if (isRetain(c)) {
      pos += c;
    } else if (isInsert(c)) {
      moved += len(c);
    } else {
      moved -= Math.min(-c, Math.max(0, index - pos));
      pos -= c;
    }
  }
  return moved;
}
