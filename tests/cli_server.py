"""A fork server for the tests' ``petah`` commands (``conftest.petah_process``): torch, timm, PEFT
and petah are imported once here, and each command runs in a forked child — a real process of
its own (its exit code, its stdout and stderr, its memory; nothing it does reaches the next
command) without the ~5 s of imports a fresh ``python -m petah`` spends on a 2-core machine
before its first line of work (about 70 test calls). The bench's fork server
(``petah.bench.methods``) is the same idea.

Protocol, one JSON line each way: ``{"args", "env", "cwd", "stdout", "stderr"}`` in (the two
paths: files the child writes its output to); ``{"pid"}`` once the child runs, then ``{"code"}``
(its exit status, or -SIGNAL) when it ended.
"""

import importlib
import json
import os
import sys

# imports only: no torch op may run here, or its thread pools would be forked
PRELOAD = ("torch", "timm", "peft", "petah.api", "petah.cli", "petah.cli.tasks", "petah.cli.show", "petah.data",
           "petah.backbones", "sklearn.datasets", "skimage.data")


def run_child(request: dict) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)  # the request channel is not the command's input
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = ["petah", *request["args"]]
    code = 0
    try:
        from petah.cli import main

        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | type(None)):
            print(exc.code, file=sys.stderr)
    except BaseException:  # what python -m petah would print and exit 1 with
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    for module in PRELOAD:
        importlib.import_module(module)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"code": code}), flush=True)


if __name__ == "__main__":
    main()
