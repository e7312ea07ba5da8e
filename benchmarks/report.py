"""`reports/benchmark.md` from the measurements: every number with the machine and the precision it comes from."""

from measures import params_with


def training_flops_per_image(latent_dim: int = 50) -> float:
    """Multiply-adds of the tutorial's model, x2 (FLOPs), x3 (forward, and backward for inputs and for weights)."""
    macs = (13 * 13 * 32 * 9 * 1 + 6 * 6 * 64 * 9 * 32 + 2304 * 2 * latent_dim  # encoder
            + latent_dim * 7 * 7 * 32 + 7 * 7 * 9 * 32 * 64 + 14 * 14 * 9 * 64 * 32 + 28 * 28 * 9 * 32)  # decoder
    return 2 * 3 * macs


def precision_of(name: str, machine: dict) -> str:
    """The precision a configuration trains in here (`auto` resolved as the train stage resolves it)."""
    for precision in ("mixed_bfloat16", "mixed_float16", "float32"):
        if precision in name:
            return precision
    if name.startswith("default"):
        return f"{machine['auto_precision']} (auto)"
    return "float32"


def header(results: dict, summary: dict) -> list[str]:
    m, peak = results["machine"], results["peak"]
    gpus = ", ".join(m["gpus"]) or "no GPU"
    flags = " ".join(m["cpu_flags"]) or "none of avx2, avx512f, avx512_bf16, amx_bf16"
    return [
        "# Benchmarks", "",
        f"Measured {m['date']} on **{m['cpu']}** (CPU flags: {flags}), {m['cores']} cores, {gpus}, Python "
        f"{m['python']}, TensorFlow {m['tensorflow']}: every number below comes from this machine, in the "
        "precision its row names. The yardstick is the tutorial's training loop (`benchmarks/tutorial_loop.py`, "
        "float32, written from the tutorial's description), run alternately with the project in the same session, "
        "on the same training images.", "",
        f"`train.precision: auto` chose **{m['auto_precision']}** here ({m['auto_precision_reason']}).", "",
        f"Matrix-product peak (2048x2048): float32 {peak['float32']:.0f} GFLOP/s, bfloat16 {peak['bfloat16']:.0f} "
        f"GFLOP/s. One training image costs {summary['flops_per_image'] / 1e6:.1f} MFLOP.", "",
        *([] if m["gpus"] else [
            "No GPU here, so none of these numbers is a GPU's. What is known about GPUs, and the one measurement made "
            "on one (the IWAE pass through Keras on JAX, `benchmarks/iwae_jax.py`, on an H100 where TensorFlow could "
            "not be installed), is in docs/performance.md, *On a GPU*.", ""]),
    ]


def throughput(results: dict, summary: dict) -> list[str]:
    if not summary["images_per_second"]:
        return []
    m, peak = results["machine"], results["peak"]
    windows = next(iter(results["configs"].values()))
    lines = ["## Inside an epoch: the training loop's throughput", "",
             f"Medians of {len(windows['windows'])} windows of {windows['window_images']:,} training images after a "
             "warm-up, each configuration in a fresh process.",
             "", "| configuration | precision | images/s | GFLOP/s | of float32 peak | vs yardstick |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    reference = summary.get("reference_images_per_second")
    if reference:
        gflops = reference * summary["flops_per_image"] / 1e9
        lines.append(f"| yardstick: tutorial_loop.py | float32 | {reference:.0f} | {gflops:.0f} | "
                     f"{gflops / peak['float32']:.0%} | 1.00x |")
    for name, rate in summary["images_per_second"].items():
        ratio = f"{rate / reference:.2f}x" if reference else "n/a"
        lines.append(f"| {name} | {precision_of(name, m)} | {rate:.0f} | {summary['gflops'][name]:.0f} | "
                     f"{summary['gflops'][name] / peak['float32']:.0%} | {ratio} |")
    lines += ["", f"Fastest: {summary['fastest']}. The default ({m['auto_precision']}) trains at "
              f"{summary['default_vs_best_precision']:.2f}x the faster of float32 and mixed_bfloat16 at its other "
              "settings.", ""]
    return lines


def stages(results: dict, summary: dict) -> list[str]:
    if "stages" not in summary:
        return []
    m = results["machine"]
    short, long = sorted({run["epochs"] for run in next(iter(results["stages"].values()))})
    repetitions = sum(run["epochs"] == short for run in next(iter(results["stages"].values())))
    images = next(iter(results["stages"].values()))[0].get("train_images")
    tests = next((run["test_images"] for run in results.get("reference_stages", []) if "test_images" in run), None)
    lines = ["## By the wall clock: the whole train stage", "",
             f"Per epoch: ({long}-epoch run - {short}-epoch run) / {long - short}, both from scratch on the same "
             + (f"{images:,} " if images else "") + "training images (the prepared file's training split), launch "
             f"to exit, median of {repetitions} repetition(s): the project's `stages/train.py` (checkpoint after "
             "every epoch, MLflow logging, progress grid, its per-epoch scoring set scored in float32) against the "
             "yardstick's whole script (which scores its " + (f"{tests:,} " if tests else "") + "test images every "
             "epoch). *Between epochs*: the share of an epoch, from the stage's own history, that is neither training "
             "nor scoring (median and worst).", "",
             "| train stage | precision | s an epoch | scoring | between epochs | vs yardstick |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    reference = summary.get("reference_epoch_seconds")
    if "reference_epoch_seconds" in summary:
        seconds = f"{reference:.1f}" if reference else "n/a (disturbed)"
        lines.append(f"| yardstick: tutorial_loop.py | float32 | {seconds} | (inside) | n/a | 1.00x |")
    for name, row in summary["stages"].items():
        ratio = f"**{row['ratio']:.2f}x**" if row["ratio"] else "n/a"
        seconds = f"{row['epoch_seconds']:.1f}" if row["epoch_seconds"] else "n/a (disturbed)"
        lines.append(f"| {name} | {precision_of(name, m)} | {seconds} | "
                     f"{row['scoring_seconds']:.2f} s | {row['between_epochs_median']:.2%} (worst "
                     f"{row['between_epochs_max']:.2%}) | {ratio} |")
    spreads = [f"{name}: {', '.join(f'{ratio:.2f}x' for ratio in row['ratio_by_repetition'])}"
               for name, row in summary["stages"].items() if len(row.get("ratio_by_repetition", [])) > 1]
    if spreads:
        lines += ["", "Each repetition's ratio (yardstick and project run back to back; their spread is the noise): "
                  + "; ".join(spreads) + "."]
    left_out = {"yardstick": summary.get("reference_disturbed", 0),
                **{name: row.get("disturbed", 0) for name, row in summary["stages"].items()}}
    if any(left_out.values()):
        lines += ["", "Repetitions left out as disturbed (their short and long runs timed the epochs both train more "
                  f"than {summary['disturbed_threshold']:.0%} apart: something else ran beside one of them), of "
                  f"{repetitions}: " + "; ".join(f"{name} {count}" for name, count in left_out.items())
                  + ". Where every one was, rerun `make bench` on a quieter machine."]
    return [*lines, ""]


def time_to_quality(results: dict, summary: dict, target: float, yardstick_epochs: int) -> list[str]:
    ttq = summary.get("time_to_quality")
    if not ttq:
        return []
    m = results["machine"]
    train = params_with().train
    recipe = (f"{train.epochs} epochs, batch {train.batch_size}, Adam {train.learning_rate:g}, {train.schedule} "
              f"schedule" + (f" ({train.warmup_epochs} warm-up epoch(s), to {train.final_learning_rate:g})"
                             if train.schedule == "cosine" else "")
              + (f", the average of the weights at momentum {train.ema_momentum:g} scored and saved"
                 if train.ema_momentum else ""))
    lines = ["## Time to quality", ""]
    split = ttq.get("split", "test")
    if ttq["epoch"] is None:
        return [*lines, f"The default train stage ({recipe}) did NOT reach {split} ELBO {target} (final "
                        f"{ttq['final_elbo']:.2f}).", ""]
    lines.append(f"The default train stage ({recipe}; {m['auto_precision']} here, scored in float32) reached {split} "
                 f"ELBO {target} after epoch {ttq['epoch']}, **{ttq['seconds']:.0f} s** from launch (its final "
                 f"{split} ELBO after {train.epochs} epochs: {ttq['final_elbo']:.2f}).")
    if "ratio" in ttq:
        lines.append(f"The yardstick's time to {target}, an assumption made explicit: it needs {yardstick_epochs} "
                     "epochs at Adam 1e-4 (measured for issue 16; the tutorial printed -78.3 after 100), each at "
                     f"its epoch time measured above, plus its start: {ttq['yardstick_seconds']:.0f} s. The project "
                     f"is **{ttq['ratio']:.1f}x** faster to quality (the target: 8x).")
    return [*lines, ""]


def fixed_costs(results: dict) -> list[str]:
    lines = []
    if "iwae" in results:
        iwae = results["iwae"]
        lines += [f"IWAE bound (evaluate stage, float32): k = {iwae['k']} on {iwae['images']:,} test images in "
                  f"{iwae['seconds']:.0f} s.", ""]
    startup = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in results["startup"].items())
    noop = results["noop_repro"]
    noop_text = f"{noop['seconds']:.2f} s" if noop.get("seconds") is not None else noop["note"]
    logging = results["mlflow"]
    return [*lines, "Fixed costs:", "",
            f"- no-op `dvc repro`: {noop_text}",
            f"- stage start-up (process start and imports): {startup}",
            f"- MLflow: {logging['per_epoch_seconds'] * 1000:.0f} ms to log an epoch (one batched call, on the "
            f"checkpoint's thread), {logging['setup_seconds']:.1f} s to open the run and log params, "
            f"{logging['model_seconds']:.1f} s to log the model (once a training)."]


def report(results: dict, summary: dict, target: float, yardstick_epochs: int) -> str:
    lines = [*header(results, summary), *throughput(results, summary), *stages(results, summary),
             *time_to_quality(results, summary, target, yardstick_epochs), *fixed_costs(results)]
    return "\n".join(lines) + "\n"
