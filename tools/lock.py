"""The install lock: write it from an environment, check an environment against it, or list what moved.

``requirements/lock.txt`` is a pip *constraints* file: the exact version of every package the set-up commands
install, except torch and torchvision (their build, CPU or CUDA, is chosen in the Makefile) and the CUDA-only
packages a CUDA torch brings with it (``nvidia-*``, ``triton``, ``cuda-*``), which that torch pins itself.

    python tools/lock.py freeze -o requirements/lock.txt   # from the running environment (make lock)
    python tools/lock.py check requirements/lock.txt       # fail if an installed package is unlocked or differs
    python tools/lock.py diff requirements/lock.txt        # what the running environment has that the lock lacks

Standard library only: it runs before anything else is installed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

#: Never locked: medseg itself, torch (``TORCH_SPEC``), torchvision (its build is torch's pair: ``TV_TORCH_SPEC``) and
#: what a CUDA build of torch pins on its own.
UNLOCKED = re.compile(r"^(medseg|torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def normalise(name: str) -> str:
    """PEP 503 name normalisation (``Pillow`` and ``pillow``, ``typing_extensions`` and ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Installed distributions of the running interpreter, by normalised name, without the unlocked ones."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and not UNLOCKED.match(normalise(name)):
            found[normalise(name)] = dist.version
    return found


def read_lock(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by normalised name (comments and blanks skipped)."""
    pins: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: not an exact pin: {raw!r}")
        pins[normalise(name.strip())] = version.strip()
    return pins


def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "(none)"


def freeze(out: Path) -> None:
    pins = installed()
    header = [
        "# medseg install lock: pip constraints (`pip install -c requirements/lock.txt ...`), written by `make lock`.",
        f"# Resolved {_dt.date.today().isoformat()} on Python {platform.python_version()}, {sys.platform} {platform.machine()},"
        f" beside torch {_torch_version()}.",
        "# torch and torchvision are not here: TORCH_SPEC / TV_TORCH_SPEC in the Makefile pin them (CPU or CUDA build); nor are the nvidia-*/triton",
        "# packages a CUDA torch pins itself. Do not edit by hand: run `make lock`, then `make test`.",
    ]
    lines = [f"{name}=={pins[name]}" for name in sorted(pins)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(lines)} pins")


def check(lock: Path) -> int:
    pins, have = read_lock(lock), installed()
    differ = {n: (have[n], pins[n]) for n in have if n in pins and have[n] != pins[n]}
    unlocked = sorted(n for n in have if n not in pins)
    for name, (got, want) in sorted(differ.items()):
        print(f"lock check: {name} {got} is installed, the lock says {want}", file=sys.stderr)
    for name in unlocked:
        print(f"lock check: {name} {have[name]} is installed but not in {lock}", file=sys.stderr)
    if differ or unlocked:
        print("lock check: the environment is not the locked one; `make lock` refreshes the lock after a"
              " dependency change (then run `make test`)", file=sys.stderr)
        return 1
    print(f"lock check: {len(have)} packages match {lock}")
    return 0


def diff(lock: Path) -> int:
    pins, have = read_lock(lock), installed()
    rows = [(n, pins.get(n, "-"), have.get(n, "-")) for n in sorted(set(pins) | set(have)) if pins.get(n) != have.get(n)]
    print(f"{len(rows)} packages differ from {lock} (name: locked -> installed)")
    for name, old, new in rows:
        print(f"  {name}: {old} -> {new}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_freeze = sub.add_parser("freeze", help="write the lock from the running environment")
    p_freeze.add_argument("-o", "--output", type=Path, required=True)
    for name in ("check", "diff"):
        sub.add_parser(name).add_argument("lock", type=Path)
    args = parser.parse_args(argv)
    if args.command == "freeze":
        freeze(args.output)
        return 0
    return check(args.lock) if args.command == "check" else diff(args.lock)


if __name__ == "__main__":
    raise SystemExit(main())
