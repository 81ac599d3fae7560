// The browser's half of the merge (crates/tether-demo/assets/ot.js), without a browser.
// The server's half is tested in Rust (crates/tether-demo/src/ot.rs and tests/ot_properties.rs);
// both must make the same choices, so the cases here mirror those.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as ot from '../../crates/tether-demo/assets/ot.js';

/** Applies a then b', and b then a'; both must agree. Returns the result. */
function converge(text, a, b) {
  const [a2, b2] = ot.transform(a, b);
  const ab = ot.apply(b2, ot.apply(a, text));
  const ba = ot.apply(a2, ot.apply(b, text));
  assert.equal(ab, ba, `diverged for ${JSON.stringify(a)} / ${JSON.stringify(b)}`);
  return ab;
}

test('concurrent inserts at one position keep both texts, first argument first', () => {
  assert.equal(converge('hello world', [5, ' brave', 6], [5, ' new', 6]), 'hello brave new world');
  assert.equal(converge('hello world', [5, ' new', 6], [5, ' brave', 6]), 'hello new brave world');
});

test('an insert inside a concurrently deleted range survives', () => {
  assert.equal(converge('abcdefghijk', [3, 'XY', 8], [1, -6, 4]), 'aXYhijk');
});

test('overlapping deletes remove each character once', () => {
  assert.equal(converge('abcdefgh', [1, -4, 3], [3, -4, 1]), 'ah');
});

test('code points count as one character, as on the server', () => {
  assert.equal(ot.apply([1, 'é', 2], '🙂ab'), '🙂éab');
  assert.throws(() => ot.apply([3], 'abcd'));
});

test('compose is the same as applying one operation after the other', () => {
  const a = [2, 'xy', -1, 3];
  const b = [1, -2, 'Z', 4];
  const text = 'abcdef';
  assert.equal(ot.apply(ot.compose(a, b), text), ot.apply(b, ot.apply(a, text)));
});

test('a diff uses the caret to place an ambiguous insert or delete', () => {
  assert.deepEqual(ot.fromDiff('aa', 'aaa', 1), ['a', 2]);
  assert.deepEqual(ot.fromDiff('aa', 'aaa', 3), [2, 'a']);
  assert.deepEqual(ot.fromDiff('aaa', 'aa', 1), [1, -1, 1]);
  assert.deepEqual(ot.fromDiff('hello world', 'hello there', 11), [6, 'there', -5]);
  assert.deepEqual(ot.fromDiff('same', 'same'), [4]);
});

test('a caret moves with remote edits before it and stays put for edits after it', () => {
  assert.equal(ot.transformIndex([2, 'xyz', 5], 4), 7);
  assert.equal(ot.transformIndex([5, 'xyz', 2], 4), 4);
  assert.equal(ot.transformIndex([1, -2, 4], 4), 2);
  assert.equal(ot.transformIndex([1, -5, 1], 4), 1);
});

/** A small seeded generator, so a failure can be replayed. */
function rng(seed) {
  let s = seed >>> 0;
  return (n) => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s % n;
  };
}

function randomOp(random, length) {
  const b = new ot.Builder();
  let left = length;
  for (let steps = random(6); steps > 0; steps--) {
    const n = 1 + random(4);
    const kind = random(3);
    if (kind === 0) {
      b.retain(Math.min(n, left));
      left -= Math.min(n, left);
    } else if (kind === 1) {
      b.delete(Math.min(n, left));
      left -= Math.min(n, left);
    } else {
      b.insert(['x', 'yz', '🚀', 'é!'][random(4)]);
    }
  }
  return b.retain(left).ops;
}

test('any two random concurrent edits converge, and composing buffered edits is exact', () => {
  for (let seed = 1; seed <= 2000; seed++) {
    const random = rng(seed);
    const text = ['', 'ab', '🙂é ab', 'hello world'][random(4)];
    const n = ot.len(text);
    const a = randomOp(random, n);
    const b = randomOp(random, n);
    converge(text, a, b);
    const c = randomOp(random, ot.targetLen(a));
    assert.equal(ot.apply(ot.compose(a, c), text), ot.apply(c, ot.apply(a, text)), `seed ${seed}`);
  }
});
