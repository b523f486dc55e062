"""Commands that cross to other libraries: export, import (AdapterHub's and peft's formats) and
bench (throughput beside the `adapters` library)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from adapterbench.cli.common import (
    MAX_BATCH,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_THREADS,
    DataOpt,
    DebugOpt,
    ForceOpt,
    command,
    console,
    named_output,
)
from adapterbench.errors import UserError
from adapterbench.fileio import read_json


@command("export")
def export_cmd(run_dir: Path = typer.Argument(..., help="An extract run folder or adapter folder."),
               fmt: str = typer.Option("adapterhub", "--format", help="adapterhub (pfeiffer, houlsby, fusion) or peft (lora)."),
               out: Path = typer.Option(..., "--out", callback=named_output, help="Folder to write."),
               name: Optional[str] = typer.Option(None, "--name", help="Adapter name (default: the task)."),
               head: Optional[bool] = typer.Option(None, "--head/--no-head", help="Also write the head (adapterhub: "
                                                   "default; --no-head: the adapter alone, e.g. a fusion source. peft: "
                                                   "by default a sequence-classification export where the "
                                                   "architecture's head computes ours, else the encoder alone)."),
               force: bool = ForceOpt, debug: bool = DebugOpt):
    """Write an adapter (and its head) in AdapterHub's format (the `adapters` library) or peft's (LoRA)."""
    from adapterbench.interop.adapterhub import export, export_fusion
    if fmt not in ("adapterhub", "peft"):
        raise UserError(f"--format '{fmt}' is not supported: use adapterhub or peft")
    if fmt == "peft":
        from adapterbench.interop.peftio import export as export_peft
        from adapterbench.interop.peftio import plan_export
        what = plan_export(run_dir, head)[-1]
        console.print(f"exported: {export_peft(run_dir, out, force, head)}: {what}")
    elif (run_dir / "fusion" / "fusion_config.json").is_file():
        console.print(f"exported fusion: {export_fusion(run_dir, out, force)}")
    else:
        console.print(f"exported: {export(run_dir, out, name, force, with_head=head is not False)}")



@command("import")
def import_cmd(src: Path = typer.Argument(..., help="A folder saved by the `adapters` library (save_adapter; for a "
                                                   "fusion: its adapters, save_adapter_fusion and save_head in one "
                                                   "folder) or by peft (LoRA)."),
               out: Path = typer.Option(..., "--out", callback=named_output, help="adapterbench adapter folder to write."),
               model: Optional[str] = typer.Option(None, "--model", help="Base model, if not the one it names."),
               force: bool = ForceOpt, debug: bool = DebugOpt):
    """Read an AdapterHub adapter (Pfeiffer/Houlsby) or a peft LoRA adapter into an adapterbench folder."""
    from adapterbench.interop.adapterhub import import_adapter, import_fusion
    if list(src.glob("*/adapter_fusion_config.json")):
        console.print(f"imported fusion: {import_fusion(src, out, model, force)} (sources/ and fusion/)")
        return
    if not (src / "adapter_config.json").is_file():
        raise UserError(f"{src} holds no adapter_config.json: pass the folder save_adapter/save_pretrained wrote")
    if "peft_type" in read_json(src / "adapter_config.json"):
        from adapterbench.interop.peftio import import_lora
        console.print(f"imported: {import_lora(src, out, model, force)}")
    else:
        console.print(f"imported: {import_adapter(src, out, model, force)}")



@command()
def bench(model: str = typer.Option("minilm-l6", "--model", help="Model alias, folder or hub id."),
          configs: str = typer.Option("all", "--configs", help="all, or comma-separated: bare, merged, fusion2, "
                                                               "fusion4, fusion8, fusion16 and every method that "
                                                               "supports bench (adapterbench ls methods)."),
          modes: str = typer.Option("train,infer", "--modes", help="train, infer, train-split (each real "
                                                               "batch cut as runs cut it on this device), or several."),
          batch_size: int = typer.Option(32, "--batch-size", min=1, max=MAX_BATCH), seq_len: int = typer.Option(128, "--seq-len", min=8, max=MAX_SEQ_LEN),
          steps: int = typer.Option(5, "--steps", min=0, max=MAX_STEPS, help="Timed steps (0 with --task: one whole epoch)."),
          warmup: int = typer.Option(2, "--warmup", min=0, max=MAX_STEPS, help="Untimed steps first."),
          task: Optional[str] = typer.Option(None, "--task", help="Real training batches of this task."),
          pad_to_max: bool = typer.Option(False, "--pad-to-max", help="Real batches padded to --seq-len."),
          peer: bool = typer.Option(False, "--peer", help="Also run the `adapters` library (.peer-venv)."),
          peer_pad_to_max: bool = typer.Option(False, "--peer-pad-to-max",
                                               help="Peer pads to --seq-len (its GLUE script's default)."),
          compile_model: bool = typer.Option(False, "--compile", help="torch.compile our model first."),
          precision: str = typer.Option("auto", "--precision", help="Ours: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, "
                                                                   "or several side by side: fp32,bf16."),
          group_by_length: bool = typer.Option(False, "--group-by-length", help="Real batches in length-grouped order."),
          repeat: int = typer.Option(1, "--repeat", min=1, max=100, help="Measure everything N times, interleaved; keep the median."),
          threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="Torch CPU threads per measurement."),
          out: Path = typer.Option(Path("runs/bench"), "--out", callback=named_output, help="Folder for bench.json and bench.md."),
          data_dir: Optional[str] = DataOpt, debug: bool = DebugOpt):
    """Throughput (samples/s, tokens/s) and peak memory per method; the peer library side by side."""
    import json as _json

    from adapterbench.fileio import atomic_write
    from adapterbench.interop.bench import Spec, markdown, run_bench
    for name, value, low in (("--batch-size", batch_size, 1), ("--seq-len", seq_len, 8), ("--steps", steps, 0),
                             ("--warmup", warmup, 0), ("--repeat", repeat, 1), ("--threads", threads or 1, 1)):
        if value < low:
            raise UserError(f"{name} {value} is out of range: use {low} or more")
    if steps == 0 and not task:
        raise UserError("--steps 0 (one whole epoch) needs --task")
    precisions = list(dict.fromkeys(p.strip() for p in precision.split(",") if p.strip()))
    from adapterbench.recipe.precision import PRECISIONS
    for p in precisions or [""]:
        if p not in PRECISIONS:
            raise UserError(f"--precision '{p}' must be auto, fp32 or bf16 (several: fp32,bf16)")
    if threads:
        os.environ["ADAPTERBENCH_BENCH_THREADS"] = str(threads)
    spec = Spec(model, batch_size, seq_len, steps, warmup, task, pad_to_max, peer_pad_to_max,
                precision=precisions[0], group_by_length=group_by_length, compile=compile_model, data_dir=data_dir)
    show = lambda r: console.print(f"{r['side']:4s} {r['config']:9s} {r['mode']:5s} {r['precision']:4s} "
                                   f"{r['samples_per_s']:8.2f} samples/s  peak {r['peak_mib']:7.0f} MiB")
    rows = run_bench(spec, [c.strip() for c in configs.split(",") if c.strip()],
                     [m.strip() for m in modes.split(",") if m.strip()], peer, show, repeat, precisions)
    text = markdown(rows, spec)
    from dataclasses import asdict
    atomic_write(out / "bench.json", _json.dumps({"spec": asdict(spec), "rows": rows}, indent=2))
    atomic_write(out / "bench.md", text)
    print(text)
    console.print(f"written: {out / 'bench.md'}, {out / 'bench.json'}")


