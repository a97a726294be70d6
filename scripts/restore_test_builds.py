"""Resume a pilot pinned before the fix that restores a test's own build (commit a731a6b) on another machine.

A test record of a seed outside ``select_seeds`` holds its build only as the update that reached the model; the code
of such a pinned pilot restores a build from a ``build`` field that no test record has, so on a fresh machine it
would retrain every such build although its test is recorded. This writes each of those build stages' stage.json
from its test record (the result that later code restores by itself), checking that the record's stage name is the
one this code and config give. Run it with the pinned commit's code, before resuming:

    PYTHONPATH=$PWD/src python /path/to/main/scripts/restore_test_builds.py configs/decisive-gsm8k.yaml OUT
"""

import json
import sys
from pathlib import Path

from pkt.io import write_text
from pkt.studies import pilot as P
from pkt.studies import pilot_report as R


def main(config: str, out: str) -> int:
    cfg, text = P.load_config(Path(config))
    pilot = P.Pilot(cfg, out, config_text=text, dry=True)
    sweep = set(cfg.select_seeds or cfg.seeds)
    for f in sorted((Path(cfg.records) / R.TESTS).glob("*.json")):
        rec = json.loads(f.read_text(encoding="utf-8"))
        if rec["seed"] in sweep or "update" not in rec:  # a swept seed's build is restored from its point record
            continue
        name, key = pilot.build_key(rec["train_examples"], rec["epochs"], rec["lr"], rec["seed"], rec["init"])
        path = pilot.cache.path(name, key)
        if path.name != rec["build_stage"]:
            raise SystemExit(f"{f}: its build stage {rec['build_stage']} is not this code's {path.name}")
        if (path / "stage.json").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        # written atomically, like every stage record: a half-written stage.json would read as a finished stage
        write_text(path / "stage.json", json.dumps({"stage": name, "seconds": 0.0, "result": {"update": rec["update"]},
                                                    "restored_from": str(f)}))
        print(f"restored {path.name} from {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
