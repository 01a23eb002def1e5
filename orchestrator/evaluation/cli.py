"""`baichuan-audio eval openaudiobench`: run the benchmark through a served stack, score it,
write the report (README, Evaluation)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from orchestrator.evaluation.dataset import MODES, SUBSETS, DatasetError, available, load_items

EXIT_ITEMS_FAILED = 2


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("data_dir", type=Path, help="the OpenAudioBench folder (holding eval_datas/<subset>/<subset>.csv "
                                               "and eval_datas/<subset>/audios/*.mp3)")
    s.add_argument("--subset", action="append", choices=list(SUBSETS),
                   help="a subset to run (repeat for several; default: every subset DATA_DIR holds)")
    s.add_argument("--mode", choices=MODES, default="s2t",
                   help="s2t: text replies; s2s: spoken replies (saved, transcribed back for the consistency check)")
    s.add_argument("--concurrency", type=int, default=4, help="questions in flight at once (default 4)")
    s.add_argument("--limit", type=int, help="the first K items of each subset")
    s.add_argument("--out", type=Path, required=True, help="output folder (records.jsonl, audio/, report.md/json); "
                                                           "a re-run there skips the items done")
    s.add_argument("--no-asr", action="store_true", help="s2s: skip transcribing the spoken replies")
    s.add_argument("--no-judge", action="store_true", help="skip the LLM judge even if one is configured")
    s.add_argument("--judge-config", help="YAML with the judge's url, model, api_key_file, concurrency, timeout_s "
                                          "(the environment's BAICHUAN_AUDIO_JUDGE_* override it)")
    s.add_argument("--judge-url", help="OpenAI-compatible API base, e.g. https://api.openai.com/v1")
    s.add_argument("--judge-model", help="judge model (default gpt-4o-2024-08-06)")
    s.add_argument("--judge-api-key-file", help="file holding the judge's key (or BAICHUAN_AUDIO_JUDGE_API_KEY)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def eval_main(args: argparse.Namespace) -> int:
    from orchestrator.client_cli import connect
    from orchestrator.evaluation import runner
    from orchestrator.evaluation.judge import Judge, JudgeError, JudgeSettings, judge_records
    from orchestrator.evaluation.records import latest_records
    from orchestrator.evaluation.scoring import subset_report, write_report

    if args.concurrency < 1 or (args.limit is not None and args.limit < 1):
        print("error: --concurrency and --limit must be at least 1", file=sys.stderr)
        return 1
    subsets = args.subset or available(args.data_dir)
    if not subsets:
        print(f"error: {args.data_dir} holds no OpenAudioBench subset (expected eval_datas/<subset>/<subset>.csv "
              f"for one of {', '.join(SUBSETS)})", file=sys.stderr)
        return 1
    try:
        items = {s: load_items(args.data_dir, s, args.limit) for s in dict.fromkeys(subsets)}
        judge = None
        if not args.no_judge:
            settings = JudgeSettings.load(args.judge_config, url=args.judge_url, model=args.judge_model,
                                          api_key_file=args.judge_api_key_file)
            judge = Judge(settings) if settings.url else None
        client = connect(args)
    except (DatasetError, JudgeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        for subset, its in items.items():
            ran, failed = runner.run(client, its, args.mode, args.out, args.concurrency,
                                     transcribe=not args.no_asr, progress=False if args.no_progress else None)
            print(f"{subset}: {ran} run now ({failed} failed), {len(its) - ran} already done", file=sys.stderr)
    finally:
        client.close()

    latest = latest_records(args.out)
    by_id = {it.id: it for its in items.values() for it in its}
    records = [latest[f"{args.mode}:{i}"] for i in by_id if f"{args.mode}:{i}" in latest]
    grades = None
    if judge is not None:
        grades = judge_records(judge, by_id, records, args.out)
    report = {
        "run": {"address": args.address, "mode": args.mode, "concurrency": args.concurrency, "limit": args.limit,
                "subsets": list(items), "judge_model": judge.settings.model if judge else None,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "subsets": [subset_report(s, args.mode, by_id, [r for r in records if r["subset"] == s], grades)
                    for s in items],
    }
    js, md = write_report(args.out, report)
    print(md.read_text())
    print(f"wrote {md} and {js}", file=sys.stderr)
    return EXIT_ITEMS_FAILED if any(s["errors"] for s in report["subsets"]) else 0
