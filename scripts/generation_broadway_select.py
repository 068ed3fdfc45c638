"""BroadWay's bar (issue #5): motion ×1.2 or more for identity down ≤ 2 points, paired against plain.

Reads one or more `timeloom evaluate generation --study prompts` results and prints, per plug-in setting, the
paired changes against the plain row of the same run (same prompts, same noise) with 95% intervals; with
``--choose`` it applies the selection rule written in benchmarks/generation-quality.md ("Stop 13") and prints
the chosen setting's ``--broadway-with`` arguments on the last line.

    python scripts/generation_broadway_select.py runs/generation-stop13/select-128/results.json --choose
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

MOTION_BAR, IDENTITY_BAR = 1.20, -2.0  # ×1.2 motion; identity in points (per-video share of frames × 100)


def paired(entry: dict, plain: dict, key: str) -> tuple[float, float]:
    """Mean per-video difference ``entry − plain`` and its normal 95% half-width."""
    deltas = [a - b for a, b in zip(entry["per_video"][key], plain["per_video"][key], strict=True)]
    mean = sum(deltas) / len(deltas)
    spread = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1))
    return mean, 1.96 * spread / math.sqrt(len(deltas))


def pooled(paths: list[Path]) -> dict[str, dict[str, float]]:
    """Per setting found in more than one results file: the paired changes over all their videos together,
    each video against the plain row of its own run (motion: the ratio of the pooled means)."""
    videos: dict[str, list[tuple[dict, dict]]] = {}
    for path in paths:
        settings = json.loads(path.read_text())["settings"]
        for name, entry in settings.items():
            if name != "plain" and not name.startswith("real"):
                videos.setdefault(name, []).append((entry["per_video"], settings["plain"]["per_video"]))
    rows = {}
    for name, runs in videos.items():
        if len(runs) < 2:
            continue
        merged = {
            side: {
                key: [v for run in runs for v in run[i][key]] for key in ("motion_px", "identity_vs_prompt")
            }
            for i, side in enumerate(("entry", "plain"))
        }
        entry, plain = {"per_video": merged["entry"]}, {"per_video": merged["plain"]}
        scale = sum(plain["per_video"]["motion_px"]) / len(plain["per_video"]["motion_px"])
        motion, motion_ci = paired(entry, plain, "motion_px")
        identity, identity_ci = paired(entry, plain, "identity_vs_prompt")
        rows[name] = {
            "videos": len(plain["per_video"]["motion_px"]),
            "motion": 1 + motion / scale,
            "motion_ci": motion_ci / scale,
            "identity": 100 * identity,
            "identity_ci": 100 * identity_ci,
        }
    return rows


def changes(results: dict) -> dict[str, dict[str, float]]:
    """Per setting other than plain and the real clips: motion ratio, identity points, their intervals."""
    settings = results["settings"]
    plain = settings["plain"]
    scale = plain["motion_px"]["mean"]
    rows = {}
    for name, entry in settings.items():
        if name == "plain" or name.startswith("real"):
            continue
        motion, motion_ci = paired(entry, plain, "motion_px")
        identity, identity_ci = paired(entry, plain, "identity_vs_prompt")
        rows[name] = {
            "motion": entry["motion_px"]["mean"] / scale,
            "motion_ci": motion_ci / scale,
            "identity": 100 * identity,
            "identity_ci": 100 * identity_ci,
            "subject": 100 * (entry["subject_consistency"] - plain["subject_consistency"]),
            "frechet": entry["frechet"],
        }
    return rows


def seam_profile(results: dict, chunk_frames: int) -> dict[str, list[float]]:
    """Mean judged displacement per frame pair, by the pair's place in a chunk after the first: the pair that
    crosses the seam from the previous chunk, pairs inside one latent frame (the decoder's) and pairs that step
    between the chunk's latent frames. Real clips are flat; a plug-in that adds jerks rather than speed is not."""
    per_latent = (results["frames"] - 1) // (results["latent_frames"] - 1)  # decoded frames per latent one
    start, period = 1 + chunk_frames * per_latent, chunk_frames * per_latent  # the first chunk has 1 + C
    profile = {}
    for name, entry in results["settings"].items():
        curve = entry["motion_curve"]
        profile[name] = [
            sum(curve[start - 1 + p :: period]) / len(curve[start - 1 + p :: period]) for p in range(period)
        ]
    return profile


def choose(rows: dict[str, dict[str, float]]) -> str | None:
    """The rule: both bars met → least identity loss (ties: more motion); else the most motion within the
    identity bar; else the least identity loss among settings over the motion bar; else none."""
    both = [n for n, r in rows.items() if r["motion"] >= MOTION_BAR and r["identity"] >= IDENTITY_BAR]
    if both:
        return max(both, key=lambda n: (rows[n]["identity"], rows[n]["motion"]))
    within = [n for n, r in rows.items() if r["identity"] >= IDENTITY_BAR]
    if within:
        return max(within, key=lambda n: rows[n]["motion"])
    moving = [n for n, r in rows.items() if r["motion"] >= MOTION_BAR]
    return max(moving, key=lambda n: rows[n]["identity"]) if moving else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json of evaluate's prompts study")
    parser.add_argument("--choose", action="store_true", help="apply the selection rule to all rows given")
    parser.add_argument("--seams", action="store_true", help="motion by frame pair within a chunk")
    parser.add_argument("--pool", action="store_true", help="settings run in several files, pooled")
    parser.add_argument("--chunk-frames", type=int, default=2, help="latent frames per chunk (the VDM's C)")
    args = parser.parse_args()
    for path in args.results:
        results = json.loads(path.read_text())
        rows = changes(results)
        print(f"\n{path} ({results['settings']['plain']['videos']} paired videos)\n")
        print("| setting | motion | identity, points | subject cons., points | FD | bar |")
        print("|---|---|---|---|---|---|")
        for name, r in rows.items():
            met = r["motion"] >= MOTION_BAR and r["identity"] >= IDENTITY_BAR
            print(
                f"| {name} | ×{r['motion']:.3f} ± {r['motion_ci']:.3f} | {r['identity']:+.1f} ± "
                f"{r['identity_ci']:.1f} | {r['subject']:+.1f} | {r['frechet']:.1f} | {'met' if met else 'no'} |"
            )
    if args.seams:
        for path in args.results:
            results = json.loads(path.read_text())
            per_latent = (results["frames"] - 1) // (results["latent_frames"] - 1)
            # pair p of a chunk steps from decoded frame start - 1 + p: p = 0 crosses the seam from the last
            # chunk, p a multiple of per_latent steps between two latent frames of this chunk
            steps = [
                "seam" if p == 0 else ("step" if p % per_latent == 0 else "inside")
                for p in range(args.chunk_frames * per_latent)
            ]
            print(f"\n{path}: px/frame by frame pair within a chunk ({', '.join(steps)})\n")
            for name, values in seam_profile(results, args.chunk_frames).items():
                print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    if args.pool:
        print("\nPooled over the files that ran each setting\n")
        print("| setting | videos | motion | identity, points | bar |")
        print("|---|---|---|---|---|")
        for name, r in pooled(args.results).items():
            met = r["motion"] >= MOTION_BAR and r["identity"] >= IDENTITY_BAR
            print(
                f"| {name} | {r['videos']} | ×{r['motion']:.3f} ± {r['motion_ci']:.3f} | {r['identity']:+.1f} ± "
                f"{r['identity_ci']:.1f} | {'met' if met else 'no'} |"
            )
    if args.choose:  # over every file's rows, each against its own run's plain
        chosen = choose({n: r for p in args.results for n, r in changes(json.loads(p.read_text())).items()})
        print(f"\nchosen: {chosen}")
        # the last line: the chosen setting as --broadway-with arguments (evaluate's "broadway k=v, ..." name)
        print("" if chosen is None else chosen.removeprefix("broadway ").replace(", ", ","))


if __name__ == "__main__":
    main()
