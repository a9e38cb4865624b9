"""Compare two folders written by scripts/small_runs.sh (or any two study output folders) file by file.

Tables must be byte-identical. JSON files must be equal once wall times (keys ``seconds``, ``*_s``,
``wall*``, ``time``, ``*_time``, ``time_*``) and the recorded git commit are left out (NaN equals NaN
there); HTML figures once plotly's random div ids are. ``environment.json`` and logs are skipped; a
file in only one of the folders counts as a difference. Exits 1 when anything differs.

    .venv/bin/python scripts/compare_runs.py BEFORE AFTER
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DIV_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
RUN_DEPENDENT_KEY = re.compile(r"(^seconds$|_s$|^wall|(^|_)time(_|$)|^git_commit$)")


def _without_run_dependent(value):
    if isinstance(value, dict):
        return {k: _without_run_dependent(v) for k, v in value.items() if not RUN_DEPENDENT_KEY.search(k)}
    if isinstance(value, list):
        return [_without_run_dependent(v) for v in value]
    return value


def same(a: Path, b: Path) -> bool:
    x, y = a.read_bytes(), b.read_bytes()
    if x == y:
        return True
    if a.suffix == ".html":
        return DIV_ID.sub("", x.decode()) == DIV_ID.sub("", y.decode())
    if a.suffix == ".json":
        def load(data: bytes):
            return _without_run_dependent(json.loads(data, parse_constant=str))  # NaN stays the string 'NaN'

        return load(x) == load(y)
    return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    before, after = Path(args[0]), Path(args[1])
    def compared(root: Path) -> set[Path]:
        return {f.relative_to(root) for f in root.rglob("*")
                if f.is_file() and f.suffix != ".log" and f.name != "environment.json"}

    files, new = compared(before), compared(after)
    only = sorted(files ^ new)
    differ = sorted(f for f in files & new if not same(before / f, after / f))
    for f in only:
        print(f"ONLY IN {'BEFORE' if f in files else 'AFTER'} {f}")
    for f in differ:
        print(f"DIFF {f}")
    print(f"{len(files | new)} files compared, {len(differ) + len(only)} differ")
    return 1 if differ or only else 0


if __name__ == "__main__":
    sys.exit(main())
