"""Stand-ins for the commands of the README's install steps that need root or the network,
so tests/test_deploy.py can run those steps in a scratch folder as an ordinary user.

Called as ``install_shim.py NAME ARGS...`` by a wrapper named NAME on PATH. Every call is
appended to $SHIM_LOG as one JSON line ``{"command": NAME, "user": ..., "argv": [...]}``.

- sudo [-u USER] COMMAND...: runs COMMAND as the current user (``user`` records USER), except
  pip, which would install from PyPI: the test's own environment stands in for it.
- useradd, crontab: recorded only.
- install: runs the real install without -o/-g (recorded as ``owner``/``group``).
- git clone SOURCE DEST: copies $CLONE_SOURCE into DEST, failing as git does unless DEST is
  missing or empty.
- python3 -m venv DEST: links DEST to $TEST_VENV; anything else runs $REAL_PYTHON.
"""

from __future__ import annotations

import json
import os
import shutil
import sys


def log(command: str, argv: list[str], **details: str) -> None:
    with open(os.environ["SHIM_LOG"], "a", encoding="utf-8") as file:
        file.write(json.dumps({"command": command, "argv": argv, **details}) + "\n")


def real(name: str) -> str:
    """The command NAME found on PATH past the shims' own folder."""
    shims = os.path.dirname(os.environ["SHIM_LOG"])
    path = os.pathsep.join(entry for entry in os.environ["PATH"].split(os.pathsep) if entry != shims)
    found = shutil.which(name, path=path)
    if found is None:
        sys.exit(f"{name}: not found")
    return found


def main(name: str, argv: list[str]) -> int:
    if name == "sudo":
        user = "root"
        if argv[:1] == ["-u"]:
            user, argv = argv[1], argv[2:]
        log(name, argv, user=user)
        if os.path.basename(argv[0]) == "pip":
            return 0
        os.execvp(argv[0], argv)
    if name in ("useradd", "crontab"):
        log(name, argv)
        return 0
    if name == "install":
        kept, owners = [], {}
        arguments = iter(argv)
        for argument in arguments:
            if argument in ("-o", "-g"):
                owners["owner" if argument == "-o" else "group"] = next(arguments)
            else:
                kept.append(argument)
        log(name, argv, **owners)
        os.execv(real("install"), ["install", *kept])
    if name == "git":
        log(name, argv)
        if argv[:1] != ["clone"]:
            os.execv(real("git"), ["git", *argv])
        destination = argv[-1]
        if os.path.exists(destination) and os.listdir(destination):
            print(f"fatal: destination path '{destination}' already exists and is not an empty directory.", file=sys.stderr)
            return 128
        shutil.copytree(os.environ["CLONE_SOURCE"], destination, symlinks=True, dirs_exist_ok=True)
        return 0
    if name == "python3":
        if argv[:2] == ["-m", "venv"]:
            log(name, argv)
            os.symlink(os.environ["TEST_VENV"], argv[2])
            return 0
        os.execv(os.environ["REAL_PYTHON"], ["python3", *argv])
    sys.exit(f"install_shim.py: no stand-in for {name}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
