"""`finetune summary [--classes N] key=value ...`: parameters, MACs and the block map of a configuration."""

from __future__ import annotations

import argparse
import sys

from finetune.config import UsageError, compose, validate_model


def main(argv: list[str] | None = None) -> None:
    """Print what the configured classifier costs and which blocks phase 2 trains."""
    from finetune.cli import fail

    parser = argparse.ArgumentParser(prog="finetune summary", description=__doc__)
    parser.add_argument("--classes", type=int, default=5, help="number of classes of the head (default 5)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. backbone=mobilenet_v2 backbone.alpha=0.35")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose(args.overrides)
        validate_model(cfg)
    except UsageError as error:
        fail(error)
    print(render(cfg, args.classes))


def render(cfg, num_classes: int) -> str:
    """The summary text (weights are not loaded: counts do not depend on them)."""
    from omegaconf import open_dict

    from finetune.backbones import BACKBONES
    from finetune.cost import count_macs
    from finetune.model import block_map, build_classifier, model_backbone, top_blocks

    spec = BACKBONES[cfg.backbone.name]
    with open_dict(cfg):
        cfg.backbone.weights = None
    model = build_classifier(cfg, num_classes)
    backbone = model_backbone(model)
    blocks = block_map(backbone, spec)
    trained = set(top_blocks(backbone, spec, cfg.backbone.unfreeze_blocks))
    head_params = model.count_params() - backbone.count_params()
    knobs = ", ".join(f"{key} {cfg.backbone[key]}" for key in spec.extra_kwargs)
    lines = [
        f"{spec.name} ({knobs + ', ' if knobs else ''}input {cfg.backbone.input_size}) + head for {num_classes} classes",
        f"Parameters: {model.count_params():,} (backbone {backbone.count_params():,}, head {head_params:,})",
        f"MACs: {count_macs(model) / 1e6:.1f} M per image",
        f"Phase 2 trains {cfg.backbone.unfreeze_blocks} of {spec.num_blocks} blocks"
        + (" plus the final conv" if spec.final_pattern and trained else "")
        + "; BatchNorm layers stay frozen.",
        "",
        f"{'block':<20}{'layers':>7}{'params':>12}  phase 2",
    ]
    for name, layers in blocks.items():
        params = sum(layer.count_params() for layer in layers)
        lines.append(f"{name:<20}{len(layers):>7}{params:>12,}  {'trainable' if name in trained else 'frozen'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
