"""The verbs that take tasks and backbones to a device: export, import-peft, prune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from petah.cli.common import (
    AdapterDtypeOpt,
    BackboneOpt,
    JsonOpt,
    RequireSignedOpt,
    SizeOpt,
    TrustOpt,
    WeightsOpt,
    backbone,
    command_line,
    config_options,
    emit_json,
    out,
    package_intensity,
    trust_policy,
)
from petah.errors import PetahError
from petah.prune.pruner import PruneConfig


def export(
    packages: Annotated[list[Path] | None, typer.Argument(help="One or more .petah task packages.")] = None,
    backbone_spec: BackboneOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the ONNX files (<task>.onnx).")
                      ] = Path("export"),
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    parity_images: Annotated[list[Path] | None, typer.Option(
        "--parity-image", help="Real images to check ONNX against PyTorch on (repeatable).")] = None,
    ort_adapters: Annotated[bool, typer.Option(
        "--ort-adapters", help="One base.onnx for all tasks + one ONNX Runtime adapter file per task.")] = False,
    peft_dir: Annotated[Path | None, typer.Option(
        "--peft", help="Write PEFT LoRA folders instead of ONNX: DIR for one package, DIR/<task> for several.")] = None,
    int8: Annotated[str | None, typer.Option(
        "--int8", metavar="[auto]", help="int8 graphs (ONNX Runtime static QDQ, calibrated on --data): --int8 "
                                            "always quantizes; --int8 auto keeps float what loses accuracy or "
                                            "speed.")] = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="The task's images for --int8 (a folder or builtin:NAME): calibration from its training "
                       "part, the auto checks on its validation part.")] = None,
    calibration_images: Annotated[int, typer.Option(
        "--calibration-images", help="Images --int8 calibrates on.")] = 64,
    device: Annotated[bool, typer.Option(
        "--device", help="Export the backbone for a device install (no packages): one graph + weights + index, "
                         "that `petah serve -b DIR` merges task packages into without torch.")] = False,
    trust: TrustOpt = None,
    require_signed: RequireSignedOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export tasks: one merged ONNX model each, (--ort-adapters) one base + adapter files, or (--peft) PEFT
    folders; or (--device) the backbone for a device install."""
    from petah.data import Preprocess, load_image
    from petah.export import export_base_and_adapters, export_merged

    if backbone_spec is None:
        raise PetahError("name the backbone: --backbone (-b) FILE or a timm model name")
    if device:
        if packages or ort_adapters or peft_dir is not None or int8 is not None:
            raise PetahError("--device exports the backbone alone: no packages, --ort-adapters, --peft or --int8 "
                             "(a device merges packages itself)")
        from petah.export.device import export_device

        info = export_device(backbone(backbone_spec, weights, img_size), output)
        if json_out:
            emit_json({k: v for k, v in info.items() if k != "index"} | {"index_entries": len(info["index"])})
            return
        out.print(f"device backbone {info['backbone']['name']}@{info['backbone']['img_size']}px in {output}/: graph "
                  f"{info['graph_bytes']:,} bytes, weights {info['weights_bytes']:,} bytes, {len(info['index'])} "
                  "indexed weights", highlight=False)
        return
    if not packages:
        raise PetahError("name one or more .petah packages to export (or --device for the backbone alone)")

    policy = trust_policy(trust, require_signed, packages)  # every package, before anything loads or is written
    int8_data = None
    if int8 is not None:  # mode and data are checked by export_merged, before any export
        from petah.data import BUILTIN, load_dataset

        if peft_dir is not None:
            raise PetahError("--int8 makes ONNX graphs; it does not go with --peft")
        if ort_adapters and int8 != "always":
            raise PetahError("--int8 auto checks one task's merged graph; with --ort-adapters use --int8 (always)")
        if len(packages) > 1 and not ort_adapters:
            raise PetahError("--int8 calibrates on one task's images (--data): export one package at a time")
        if data is not None:  # a built-in set keeps its fixed split; a plain folder gives a fifth to validation
            builtin = data.startswith("builtin:") or data in BUILTIN
            int8_data = load_dataset(data, val_split=None if builtin else 0.2,
                                     intensity=package_intensity(packages[0]))
    bb = backbone(backbone_spec, weights, img_size)
    if peft_dir is not None:
        _export_peft(bb, packages, peft_dir, json_out, policy)
        return
    real = None
    if parity_images:  # as the first package sees them (its intensity mode): parity compares ONNX and torch
        mode = package_intensity(packages[0])  # on the same input, so one realistic input serves every task
        real = Preprocess(bb.img_size, bb.mean, bb.std).batch([load_image(p, mode) for p in parity_images])
    if ort_adapters:
        calibration = None
        if int8 is not None:
            if int8_data is None:
                raise PetahError("--int8 needs --data: images to calibrate the base graph on")
            from petah.export.onnx import calibration_batches
            from petah.packages import read_manifest

            # one base for several tasks: any of their images, the classes need not match
            calibration = calibration_batches(read_manifest(packages[0]), int8_data[0], calibration_images,
                                              check_classes=False)
        result = export_base_and_adapters(bb, list(packages), output, real, calibration, trust=policy).to_dict()
        if json_out:
            emit_json(result)
            return
        table = Table(title=f"{result['base']} ({result['base_bytes']:,} bytes) + ONNX Runtime adapters")
        for col in ("task", "adapter file", "bytes", "% of base", "max |onnx - torch|"):
            table.add_column(col)
        for r in result["tasks"]:
            table.add_row(r["task"], r["adapter"], f"{r['adapter_bytes']:,}", f"{r['percent_of_base']:.2f}",
                          f"{r['max_abs_error']:.2e}")
        out.print(table)
        return
    results = [export_merged(bb, pkg, output / f"{pkg.stem}.onnx", real, int8=int8, data=int8_data,
                             calibration_images=calibration_images, trust=policy).to_dict() for pkg in packages]
    if json_out:
        emit_json({"exports": results})
        return
    for r in results:
        if "int8" in r:
            q = r["int8"]
            scores = (f"; {q['metric']} float {q['float_score']:.2f} / int8 {q['int8_score']:.2f}, "
                      f"{q['float_ms']:.3f} / {q['int8_ms']:.3f} ms" if q["metric"] else "")
            out.print(f"{r['task']}: int8 {'written' if q['quantized'] else 'NOT used, float written'} "
                      f"({q['quantized_nodes'] - len(q['float_nodes'])} of {q['quantized_nodes']} layers int8; float "
                      f"ops: {', '.join(q['float_op_types'])}){scores}. {q['reason']}", highlight=False,
                      soft_wrap=True)
    table = Table(title=f"ONNX exports in {output}/ (opset 17, adapters merged)")
    for col in ("task", "file", "bytes", "max |onnx - torch|"):
        table.add_column(col)
    for r in results:
        table.add_row(r["task"], r["path"], f"{r['onnx_bytes']:,}", f"{r['max_abs_error']:.2e}")
    out.print(table)


def _export_peft(bb, packages: list[Path], folder: Path, json_out: bool, policy) -> None:
    from petah.export.peft_interop import export_peft_folders

    results = export_peft_folders(bb, packages, folder, trust=policy)
    if json_out:
        emit_json({"exports": results})
        return
    table = Table(title="PEFT LoRA folders (load with PeftModel.from_pretrained on the timm model with its classifier)")
    for col in ("task", "folder", "adapter_model.safetensors bytes", "max |peft - petah|"):
        table.add_column(col)
    for r in results:
        table.add_row(r["task"], r["folder"], f"{r['files']['adapter_model.safetensors']:,}",
                      f"{r['max_abs_error']:.2e}")
    out.print(table)


def import_peft_cmd(
    folder: Annotated[Path, typer.Argument(help="A PEFT LoRA folder (adapter_config.json + "
                                                "adapter_model.safetensors).")],
    backbone_spec: BackboneOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="The .petah package to write.")],
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    task: Annotated[str | None, typer.Option("--task", help="Task name (default: from the folder).")] = None,
    labels: Annotated[str | None, typer.Option(
        "--labels", help="Comma-separated class names (default: from the folder, else 0..N-1).")] = None,
    adapter_dtype: AdapterDtypeOpt = "float16",
    json_out: JsonOpt = False,
) -> None:
    """Turn a PEFT LoRA folder trained on the same timm backbone into a .petah package."""
    from petah import api
    from petah.export.peft_interop import import_peft
    from petah.packages.format import write_package

    api.check_writable(output)
    bb = backbone(backbone_spec, weights, img_size)
    names = [x.strip() for x in labels.split(",")] if labels else None
    package, info = import_peft(bb, folder, task, names, adapter_dtype)
    path = write_package(output, package)
    info = {**info, "package": str(path), "package_bytes": path.stat().st_size}
    if json_out:
        emit_json(info)
        return
    out.print(f"[bold]{path}[/bold]: task {info['task']}, {info['lora_layers']} LoRA layers, "
              f"{len(info['owned_modules'])} owned modules, {info['classes']} classes, "
              f"{info['package_bytes']:,} bytes; "
              f"max |petah - peft| {info['max_abs_error']:.2e}" + ("" if info["backbone_checked"] else
              " (the folder names no backbone fingerprint: make sure it was trained on these weights)"))


@config_options(PruneConfig, "config")
def prune(
    backbone_spec: BackboneOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Pruned backbone file to write (.safetensors).")],
    data: Annotated[list[str] | None, typer.Option(
        "--data", help="Images of a task the backbone serves (any DATA form); repeat for several tasks.")] = None,
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    json_out: JsonOpt = False,
    config: PruneConfig = None,
) -> None:
    """Step 3: structurally prune the shared backbone (channels and heads) for the device; write a backbone file."""
    from petah import api
    from petah.data import load_dataset

    api.check_writable(output)  # before the backbone and data load; api.prune_backbone checks all of output
    bb = backbone(backbone_spec, weights, img_size)
    datasets = [load_dataset(spec, seed=config.seed)[0] for spec in data or []]
    _pruned, report = api.prune_backbone(bb, config=config, datasets=datasets, output=output, command=command_line())
    info = api.inspect_backbone(output)
    summary = {"backbone": str(output), **{k: info[k] for k in ("fingerprint", "params", "macs", "file_bytes")},
               "base": report["base"], "heads_removed": sum(report["heads_removed"].values()),
               "recovery": report["recovery"], "config": config.to_dict()}
    if json_out:
        emit_json(summary)
        return
    base = report["base"]
    out.print(f"wrote {output}: {info['params']:,} parameters ({100 * info['params'] / base['params']:.1f} % of "
              f"{bb.name}), {info['macs'] / 1e6:.1f} M MACs ({100 * info['macs'] / base['macs']:.1f} %), "
              f"{summary['heads_removed']} heads removed, {info['file_bytes']:,} bytes")


def upgrade(
    package: Annotated[Path, typer.Argument(help="A .petah package (format 1, 2 or 3).")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Where to write the upgraded package (default: replace PKG, atomically).")] = None,
    trust: TrustOpt = None,
    require_signed: RequireSignedOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Rewrite a package in the current format (v2: the content hash covers manifest and tensors; v3: a
    dense task's package carries its head's graph, which a device install needs)."""
    from petah.packages import read_package, upgrade_package, write_package
    from petah.runtime.attach import add_head_graph

    path, was = upgrade_package(package, output, trust=trust_policy(trust, require_signed))
    upgraded = read_package(path)
    resign = False
    if add_head_graph(upgraded):  # a new hash: an old signature no longer applies
        resign, upgraded.signature = bool(upgraded.signature), ""
        write_package(path, upgraded)
    version = upgraded.manifest.format_version
    summary = {"package": str(path), "from_version": was, "format_version": version,
               "package_bytes": path.stat().st_size, "signature_removed": resign}
    if json_out:
        emit_json(summary)
        return
    out.print(f"wrote {path}: format {was} -> {version}, {summary['package_bytes']:,} bytes"
              + ("; its signature was removed (the head graph changed its content hash): sign it again" if resign
                 else ""))


COMMANDS = {"export": export, "import-peft": import_peft_cmd, "prune": prune, "upgrade": upgrade}
