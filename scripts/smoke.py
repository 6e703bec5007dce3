"""Run every bundled workflow, unchanged, on tiny random-weight models: no ComfyUI, no weights, no GPU.

    python scripts/smoke.py [OUT_DIR]        (bash scripts/smoke.sh installs the dependencies first)

Writes OUT_DIR/models (the tiny models tree, in the real file formats, under the names the
workflows use) and OUT_DIR/output (what each workflow's SaveImage nodes save). The workflows run
through the repository's API-format runner (tests/workflow_runner.py), which follows ComfyUI's
validation and execution rules. The pictures are noise because the weights are random: this
proves the loading, sampling and saving paths work, not the picture quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model generator and the API-format runner

from packload import load_pack, pack_module  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=str(ROOT / "smoke-output"))
    parser.add_argument("--workflow", action="append", help="run only this workflow (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out_dir).resolve()

    from tiny import make_tree
    from workflow_runner import WorkflowError, WorkflowRunner

    pack = load_pack()
    bridge = pack_module("nodes.comfy_bridge")
    started = time.perf_counter()
    make_tree(out / "models")
    print(f"tiny models written to {out / 'models'} in {time.perf_counter() - started:.1f} s")
    bridge.set_models_root(out / "models")
    runner = WorkflowRunner(pack.NODE_CLASS_MAPPINGS, ROOT / "workflows" / "inputs", out / "output")

    names = args.workflow or sorted(p.stem for p in (ROOT / "workflows" / "api").glob("*.json"))
    failures = 0
    for name in names:
        prompt = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))
        started = time.perf_counter()
        try:
            result = runner.run(prompt)
        except WorkflowError as exc:
            failures += 1
            print(f"FAIL  {name}: {exc}")
            continue
        files = [f"{item['subfolder']}/{item['filename']}" for ui in result.ui.values() for item in ui["images"]]
        print(f"ok    {name:32s} {time.perf_counter() - started:6.1f} s  -> {', '.join(files)}")
    print(f"\nOutputs are in {out / 'output'}.")
    print("The weights are random, so every picture is noise: this run checks the plumbing, not the quality.")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
