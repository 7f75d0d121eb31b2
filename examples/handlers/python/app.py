"""An otabox handler in Python: `example/config-file:1`.

Validates a `key = value` configuration file given in the manifest,
atomically replaces the declared file, keeps the old content for rollback
and may run a reload command:

    {"path": "/etc/example/app.conf", "version": "3",
     "content": "port = 8080\\n", "reload": ["/usr/bin/systemctl", "reload", "app"]}

Built with componentize-py against `../wit` (see build.sh).
"""

import json
import os
import re

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import checkpoint, context, process, types

UPDATE_TYPE = "example/config-file:1"
BACKUP_KEY = "backup"
KEY = re.compile(r"^[A-Za-z0-9_.-]+$")

# Result codes (0 is never a failure).
INVALID_MANIFEST = 10
READ_FAILED = 20
WRITE_FAILED = 21
RELOAD_REFUSED = 22
RELOAD_FAILED = 23
NOT_IN_PLACE = 24
VENDOR_FACILITY = 7


def status(code, message):
    return types.Status(code, types.ExtendedCode(VENDOR_FACILITY, 0, 0), message[:1024], [])


def failed(code, message):
    return types.Outcome_Failed(status(code, message))


class Invalid(Exception):
    pass


def parse(manifest):
    """The checked manifest, or Invalid naming what is wrong."""
    try:
        m = json.loads(manifest)
    except ValueError as e:
        raise Invalid(f"the manifest is not JSON: {e}")
    if not isinstance(m, dict):
        raise Invalid("the manifest must be a JSON object")
    unknown = set(m) - {"path", "version", "content", "reload"}
    if unknown:
        raise Invalid(f"unknown field {sorted(unknown)[0]!r}")
    path, version, content = m.get("path"), m.get("version"), m.get("content")
    if not isinstance(path, str) or not path.startswith("/"):
        raise Invalid("`path` must be an absolute path")
    if not isinstance(version, str) or not version:
        raise Invalid("`version` must be a non-empty string")
    if not isinstance(content, str):
        raise Invalid("`content` must be a string")
    for n, line in enumerate(content.splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key, eq, _ = text.partition("=")
        if not eq or not KEY.match(key.strip()):
            raise Invalid(f"line {n} of `content` is not `key = value`: {text!r}")
    reload = m.get("reload", [])
    if not isinstance(reload, list) or not all(isinstance(a, str) for a in reload):
        raise Invalid("`reload` must be a list of strings (program first)")
    m["reload"] = reload
    return m


def read(path):
    """The file's text, or None when it does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_atomic(path, text):
    tmp = path + ".otabox-new"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def phase(ctx, body):
    """Runs `body(manifest)`; an invalid manifest or an OS error fails."""
    try:
        return body(parse(ctx.manifest))
    except Invalid as e:
        return failed(INVALID_MANIFEST, str(e))
    except OSError as e:
        return failed(WRITE_FAILED, f"{e.filename or 'file'}: {e.strerror or e}")


def reload(m):
    if not m["reload"]:
        return types.Outcome_Success()
    program, *args = m["reload"]
    try:
        out = process.run(process.Command(program, args, [], None, 30000))
    except Err as e:
        return failed(RELOAD_REFUSED, f"the host refused {program}: {e.value.value}")
    if out.exit_code != 0:
        said = out.stderr.decode("utf-8", "replace").strip()
        return failed(RELOAD_FAILED, f"{program} exited with {out.exit_code}: {said}")
    return types.Outcome_Success()


class Handler(exports.Handler):
    def describe(self):
        return types.Description(
            "config-file-python", "1.0.0", [UPDATE_TYPE], "1.1.0", True, types.RebootBehaviour.NEVER
        )

    def validate(self, ctx):
        try:
            m = parse(ctx.manifest)
        except Invalid as e:
            raise Err(status(INVALID_MANIFEST, str(e)))
        return types.Plan(
            f"{m['path']}@{m['version']}", [], types.RebootExpectation.NONE, [], []
        )

    def is_installed(self, ctx):
        try:
            m = parse(ctx.manifest)
            return read(m["path"]) == m["content"]
        except Invalid as e:
            raise Err(status(INVALID_MANIFEST, str(e)))
        except OSError as e:
            raise Err(status(READ_FAILED, f"cannot read {e.filename}: {e.strerror or e}"))

    def download(self, ctx):
        return types.Outcome_Success()

    def backup(self, ctx):
        def body(m):
            kept = json.dumps({"content": read(m["path"])}).encode()
            checkpoint.set(BACKUP_KEY, kept)
            return types.Outcome_Success()

        return phase(ctx, body)

    def install(self, ctx):
        def body(m):
            write_atomic(m["path"], m["content"])
            context.log(types.LogLevel.INFO, f"wrote {m['path']} version {m['version']}")
            return types.Outcome_Success()

        return phase(ctx, body)

    def apply(self, ctx):
        return phase(ctx, reload)

    def verify(self, ctx):
        def body(m):
            if read(m["path"]) != m["content"]:
                return failed(NOT_IN_PLACE, f"{m['path']} does not hold version {m['version']}")
            return types.Outcome_Success()

        return phase(ctx, body)

    def commit(self, ctx):
        checkpoint.remove(BACKUP_KEY)
        return types.Outcome_Success()

    def rollback(self, ctx):
        def body(m):
            kept = checkpoint.get(BACKUP_KEY)
            if kept is None:
                return types.Outcome_Skipped("nothing was changed")
            previous = json.loads(kept)["content"]
            if previous is None:
                try:
                    os.remove(m["path"])
                except FileNotFoundError:
                    pass
            else:
                write_atomic(m["path"], previous)
            context.log(types.LogLevel.INFO, f"restored {m['path']}")
            return types.Outcome_Success()

        return phase(ctx, body)

    def cleanup(self, ctx):
        def body(m):
            try:
                os.remove(m["path"] + ".otabox-new")
            except FileNotFoundError:
                pass
            return types.Outcome_Success()

        return phase(ctx, body)

    def inventory(self, config):
        return []
