"""The read-only verbs: inspect a package or backbone file, show what a plan would adapt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from petah.cli.common import (
    JsonOpt,
    RequireSignedOpt,
    SizeOpt,
    TrustOpt,
    WeightsOpt,
    backbone,
    config_options,
    emit_json,
    out,
    print_fields,
    trust_policy,
)
from petah.errors import PetahError
from petah.plans import PlanConfig


def inspect_(
    package: Annotated[Path, typer.Argument(help="A .petah task package, or a petah backbone file (.safetensors).")],
    trust: TrustOpt = None,
    require_signed: RequireSignedOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Show a package's manifest and sizes, or a backbone file's parameters, MACs and size."""
    from petah.packages import describe_package

    if package.suffix == ".safetensors":
        if trust is not None or require_signed:  # a backbone file has no signature: never pass it silently
            raise PetahError(f"{package} is a backbone file; --trust and --require-signed check .petah packages")
        return _inspect_backbone(package, json_out)
    info = describe_package(package, trust=trust_policy(trust, require_signed))
    if json_out:
        emit_json(info)
        return
    print_fields(str(package), [
        ("task", f"{info['task']['name']} ({info['task']['kind']}, {len(info['task']['labels'])} classes)"),
        ("backbone", f"{info['backbone']}@{info['img_size']}px  {info['fingerprint'][:16]}"),
        ("plan", json.dumps(info["plan"])),
        ("adapted layers", str(info["adapted_layers"])),
        *stage_rows(info["stages"]),
        ("package", f"{info['package_bytes']:,} bytes"),
        ("backbone", f"{info['backbone_bytes']:,} bytes (fp32, no classifier)"),
        ("ratio", f"{100 * info['ratio']:.3f} %" if info["ratio"] else "?"),
        *[(k, str(info["metrics"][k])) for k in ("mIoU", "mAP", "mAP50") if k in info["metrics"]],
        ("accuracy", str(info["metrics"].get("accuracy"))),
        ("sections", ", ".join(f"{k}: {v['parameters']:,} params" for k, v in info["sections"].items())),
        ("format", f"v{info['format_version']}, content sha256 {info['content_sha256'][:16]}"
                   if info["content_sha256"] else f"v{info['format_version']}: no manifest hash (petah upgrade)"),
        ("signature", f"verified against --trust {trust}" if info["signature_verified"] else
                      "present (not verified: --trust DIR checks it)" if info["signature_present"] else "none"),
        ("created", f"{info['created_at']} by petah {info['petah_version']}"),
    ])


def stage_rows(stages: dict) -> list[tuple[str, str]]:
    """One line per backbone stage: its LoRA layers and ranks, its channel scales."""
    rows = []
    for stage, row in stages.items():
        ranks = (f"rank {row['rank_min']}" if row["rank_min"] == row["rank_max"]
                 else f"ranks {row['rank_min']}-{row['rank_max']}") if row["lora_layers"] else ""
        parts = [f"{row['lora_layers']} LoRA layers" + (f", {ranks} (sum {row['rank_sum']})" if ranks else "")]
        if row["channel_scales"]:
            parts.append(f"{row['channel_scales']} channel scales")
        rows.append((f"  stage {stage}", "; ".join(parts)))
    return rows


def _inspect_backbone(path: Path, json_out: bool) -> None:
    from petah import api

    if not path.is_file():
        raise PetahError(f"backbone file not found: {path}")
    info = api.inspect_backbone(path)
    if json_out:
        emit_json(info)
        return
    pruning = info["pruning"]
    rows = [
        ("backbone", f"{'pruned ' if info['pruned'] else ''}{info['backbone']}@{info['img_size']}px  "
                     f"{info['fingerprint'][:16]}"),
        ("parameters", f"{info['params']:,}"),
        ("MACs", f"{info['macs']:,} per image"),
        ("file", f"{info['file_bytes']:,} bytes"),
        ("features", str(info["num_features"])),
    ]
    if pruning:
        base = pruning["base"]
        rows += [("pruned from", f"{base['fingerprint'][:16]}: {base['params']:,} parameters, {base['macs']:,} MACs"),
                 ("pruning", json.dumps(pruning["config"]))]
    print_fields(str(path), rows)


plan_app = typer.Typer(no_args_is_help=True, help="Adapter plans: what a task would adapt.")


@plan_app.command("show")
@config_options(PlanConfig, "plan", exclude=("dropout",))  # dropout changes no layer or count
def plan_show(
    backbone_spec: Annotated[str | None, typer.Argument(
        help="A petah backbone file, or a timm model name (with --package: the package's).")] = None,
    package: Annotated[Path | None, typer.Option(
        "--package", help="Show the plan a package holds (a --budget plan's ranks exist only there).")] = None,
    classes: Annotated[int, typer.Option(help="Classes of the head counted in the trainable total.")] = 10,
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    json_out: JsonOpt = False,
    plan: PlanConfig = None,
) -> None:
    """List the layers a plan adapts on a backbone and the trainable parameters, before training."""
    from petah import api

    targets = None
    if package is not None:  # layer shapes need only the architecture: the package names it
        from petah.packages import read_package

        manifest = read_package(package).manifest
        plan, targets, classes = manifest.plan.plan_config(), list(manifest.plan.targets), len(manifest.labels)
        backbone_spec, img_size = backbone_spec or manifest.backbone.name, img_size or manifest.backbone.img_size
    elif backbone_spec is None:
        raise PetahError("name a backbone (a file or a timm model name), or give --package")
    summary = api.plan_summary(backbone(backbone_spec, weights, img_size), plan=plan, classes=classes, targets=targets)
    if json_out:
        emit_json(summary)
        return
    table = Table(title=f"plan {plan.preset} on {summary['backbone']} @ {summary['img_size']} px "
                        f"(family: {summary['family'] or 'generic'})")
    for col in ("layer", "type", "method", "rank", "parameters"):
        table.add_column(col, justify="right" if col in ("rank", "parameters") else "left", overflow="fold")
    for layer in summary["layers"]:
        table.add_row(layer["module"], layer["type"], layer["method"], str(layer["rank"] or "-"),
                      f"{layer['parameters']:,}")
    out.print(table)
    for stage, text in stage_rows(summary["stages"]):
        out.print(f"{stage.strip()}: {text}")
    out.print(f"{len(summary['layers'])} adapted layers, {summary['adapter_parameters']:,} adapter + "
              f"{summary['owned_parameters']:,} owned ({summary['owned_tensors']} tensors) + "
              f"{summary['head_parameters']:,} head ({summary['head_classes']} classes) parameters = "
              f"{summary['trainable_percent']:.2f} % of the backbone's {summary['backbone_parameters']:,}")


COMMANDS = {"inspect": inspect_}
