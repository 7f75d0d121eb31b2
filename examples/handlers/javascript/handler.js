// An otabox handler in JavaScript: `example/config-file:1`.
//
// Validates a `key = value` configuration file given in the manifest,
// atomically replaces the declared file, keeps the old content for rollback
// and may run a reload command:
//
//   {"path": "/etc/example/app.conf", "version": "3",
//    "content": "port = 8080\n", "reload": ["/usr/bin/systemctl", "reload", "app"]}
//
// Built by build.sh with componentize-js (StarlingMonkey) or, with
// ENGINE=quickjs, with componentize-qjs (jco's QuickJS backend). Files go
// through the WASI filesystem the host preopens, nothing else.

import { log } from 'otabox:handler/context@1.1.0';
import * as checkpoint from 'otabox:handler/checkpoint@1.1.0';
import { run } from 'otabox:handler/process@1.1.0';
import { getDirectories } from 'wasi:filesystem/preopens@0.2.10';

const UPDATE_TYPE = 'example/config-file:1';
const BACKUP_KEY = 'backup';
const KEY = /^[A-Za-z0-9_.-]+$/;

// Result codes (0 is never a failure).
const INVALID_MANIFEST = 10;
const READ_FAILED = 20;
const WRITE_FAILED = 21;
const RELOAD_REFUSED = 22;
const RELOAD_FAILED = 23;
const NOT_IN_PLACE = 24;
const VENDOR_FACILITY = 7;

const status = (code, message) => ({
  resultCode: code,
  extendedCode: { facility: VENDOR_FACILITY, component: 0, value: 0 },
  message: String(message).slice(0, 1024),
  details: [],
});
const failed = (code, message) => ({ tag: 'failed', val: status(code, message) });
const SUCCESS = { tag: 'success' };

/** An error that already carries its result code. */
class Failure extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

// UTF-8 by hand: not every engine has TextEncoder.
function encode(text) {
  const bytes = [];
  for (const ch of text) {
    const c = ch.codePointAt(0);
    if (c < 0x80) bytes.push(c);
    else if (c < 0x800) bytes.push(0xc0 | (c >> 6), 0x80 | (c & 63));
    else if (c < 0x10000) bytes.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    else bytes.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
  }
  return new Uint8Array(bytes);
}

function decode(bytes) {
  let out = '';
  for (let i = 0; i < bytes.length; ) {
    const b = bytes[i];
    const n = b < 0x80 ? 1 : b < 0xe0 ? 2 : b < 0xf0 ? 3 : 4;
    let c = n === 1 ? b : b & (0xff >> (n + 1));
    for (let k = 1; k < n; k++) c = (c << 6) | (bytes[i + k] & 63);
    out += String.fromCodePoint(c);
    i += n;
  }
  return out;
}

/** The checked manifest; throws a Failure naming what is wrong. */
function parse(manifest) {
  let m;
  try {
    m = JSON.parse(manifest);
  } catch (e) {
    throw new Failure(INVALID_MANIFEST, `the manifest is not JSON: ${e.message}`);
  }
  const invalid = (why) => new Failure(INVALID_MANIFEST, why);
  if (typeof m !== 'object' || m === null || Array.isArray(m)) throw invalid('the manifest must be a JSON object');
  const unknown = Object.keys(m).filter((k) => !['path', 'version', 'content', 'reload'].includes(k));
  if (unknown.length) throw invalid(`unknown field '${unknown[0]}'`);
  if (typeof m.path !== 'string' || !m.path.startsWith('/')) throw invalid('`path` must be an absolute path');
  if (typeof m.version !== 'string' || !m.version) throw invalid('`version` must be a non-empty string');
  if (typeof m.content !== 'string') throw invalid('`content` must be a string');
  m.content.split('\n').forEach((line, i) => {
    const text = line.trim();
    if (!text || text.startsWith('#')) return;
    const eq = text.indexOf('=');
    if (eq < 0 || !KEY.test(text.slice(0, eq).trim())) {
      throw invalid(`line ${i + 1} of \`content\` is not \`key = value\`: '${text}'`);
    }
  });
  m.reload = m.reload ?? [];
  if (!Array.isArray(m.reload) || m.reload.some((a) => typeof a !== 'string')) {
    throw invalid('`reload` must be a list of strings (program first)');
  }
  return m;
}

/** The WASI error code of a failed filesystem call. */
const errorCode = (e) => (e && e.payload !== undefined ? e.payload : e);

/** The preopened directory holding `path`, and the path relative to it. */
function locate(path) {
  let best = null;
  for (const [dir, guest] of getDirectories()) {
    const prefix = guest.endsWith('/') ? guest : `${guest}/`;
    if (path.startsWith(prefix) && (!best || guest.length > best[1].length)) best = [dir, guest];
  }
  if (!best) throw new Failure(WRITE_FAILED, `${path} is not in a granted directory`);
  return [best[0], path.slice(best[1].length).replace(/^\/+/, '')];
}

/** The file's text, or null when it does not exist. */
function read(path) {
  let file;
  try {
    const [dir, rel] = locate(path);
    file = dir.openAt({ symlinkFollow: false }, rel, {}, { read: true });
  } catch (e) {
    if (e instanceof Failure) return null;
    if (errorCode(e) === 'no-entry') return null;
    throw new Failure(READ_FAILED, `cannot read ${path}: ${errorCode(e)}`);
  }
  const chunks = [];
  let offset = 0;
  for (;;) {
    const [bytes, end] = file.read(65536, offset);
    chunks.push(bytes);
    offset += bytes.length;
    if (end || bytes.length === 0) break;
  }
  const all = new Uint8Array(offset);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return decode(all);
}

function writeAtomic(path, text) {
  const [dir, rel] = locate(path);
  const tmp = `${rel}.otabox-new`;
  try {
    const file = dir.openAt({ symlinkFollow: false }, tmp, { create: true, truncate: true }, { write: true });
    const bytes = encode(text);
    const stream = file.writeViaStream(0);
    // blocking-write-and-flush takes at most 4096 bytes a call.
    for (let done = 0; done < bytes.length; done += 4096) {
      stream.blockingWriteAndFlush(bytes.slice(done, done + 4096));
    }
    file.sync();
    dir.renameAt(tmp, dir, rel);
  } catch (e) {
    throw new Failure(WRITE_FAILED, `cannot write ${path}: ${errorCode(e)}`);
  }
}

function remove(path) {
  try {
    const [dir, rel] = locate(path);
    dir.unlinkFileAt(rel);
  } catch (e) {
    if (!(e instanceof Failure) && errorCode(e) !== 'no-entry') {
      throw new Failure(WRITE_FAILED, `cannot remove ${path}: ${errorCode(e)}`);
    }
  }
}

/** Runs `body(manifest)` for a phase; a Failure becomes its outcome. */
function phase(ctx, body) {
  try {
    return body(parse(ctx.manifest));
  } catch (e) {
    if (e instanceof Failure) return failed(e.code, e.message);
    return failed(WRITE_FAILED, String(e));
  }
}

/** Runs `body(manifest)` for a call returning a result; a Failure is its error. */
function result(ctx, body) {
  try {
    return body(parse(ctx.manifest));
  } catch (e) {
    throw e instanceof Failure ? status(e.code, e.message) : status(READ_FAILED, String(e));
  }
}

function reload(m) {
  if (!m.reload.length) return SUCCESS;
  const [program, ...args] = m.reload;
  let out;
  try {
    out = run({ program, args, env: [], stdin: undefined, timeoutMs: 30000 });
  } catch (e) {
    const why = errorCode(e);
    return failed(RELOAD_REFUSED, `the host refused ${program}: ${why && why.val !== undefined ? why.val : why}`);
  }
  if (out.exitCode !== 0) {
    return failed(RELOAD_FAILED, `${program} exited with ${out.exitCode}: ${decode(out.stderr).trim()}`);
  }
  return SUCCESS;
}

export const handler = {
  describe() {
    return {
      name: 'config-file-javascript',
      version: '1.0.0',
      updateTypes: [UPDATE_TYPE],
      contract: '1.1.0',
      supportsRollback: true,
      reboot: 'never',
    };
  },

  validate(ctx) {
    return result(ctx, (m) => ({
      installedCriteria: `${m.path}@${m.version}`,
      payloads: [],
      reboot: 'none',
      warnings: [],
      details: [],
    }));
  },

  isInstalled(ctx) {
    return result(ctx, (m) => read(m.path) === m.content);
  },

  download() {
    return SUCCESS;
  },

  backup(ctx) {
    return phase(ctx, (m) => {
      checkpoint.set(BACKUP_KEY, encode(JSON.stringify({ content: read(m.path) })));
      return SUCCESS;
    });
  },

  install(ctx) {
    return phase(ctx, (m) => {
      writeAtomic(m.path, m.content);
      log('info', `wrote ${m.path} version ${m.version}`);
      return SUCCESS;
    });
  },

  apply(ctx) {
    return phase(ctx, reload);
  },

  verify(ctx) {
    return phase(ctx, (m) =>
      read(m.path) === m.content ? SUCCESS : failed(NOT_IN_PLACE, `${m.path} does not hold version ${m.version}`),
    );
  },

  commit() {
    checkpoint.remove(BACKUP_KEY);
    return SUCCESS;
  },

  rollback(ctx) {
    return phase(ctx, (m) => {
      const kept = checkpoint.get(BACKUP_KEY);
      if (kept === undefined) return { tag: 'skipped', val: 'nothing was changed' };
      const previous = JSON.parse(decode(kept)).content;
      if (previous === null) remove(m.path);
      else writeAtomic(m.path, previous);
      log('info', `restored ${m.path}`);
      return SUCCESS;
    });
  },

  cleanup(ctx) {
    return phase(ctx, (m) => {
      remove(`${m.path}.otabox-new`);
      return SUCCESS;
    });
  },

  inventory() {
    return [];
  },
};
