"""`finetune summary [--classes N] key=value ...`: parameters, MACs and the block map of a configuration."""

from __future__ import annotations

import argparse
import sys

from finetune.backbones import BackboneSpec
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
    from finetune.model import PREPROCESS_LAYER, block_map, build_classifier, model_backbone, top_blocks

    spec = BACKBONES[cfg.backbone.name]
    with open_dict(cfg):
        cfg.backbone.weights = None
    model = build_classifier(cfg, num_classes)
    backbone = model_backbone(model)
    blocks = block_map(backbone, spec)
    trained = set(top_blocks(backbone, spec, cfg.backbone.unfreeze_blocks))
    fixed = sum(layer.count_params() for layer in model.layers if layer.name == PREPROCESS_LAYER)  # Caffe's 1x1 conv
    head_params = model.count_params() - backbone.count_params() - fixed
    knobs = ", ".join(f"{key} {cfg.backbone[key]}" for key in spec.extra_kwargs)
    lines = [
        f"{spec.name} ({knobs + ', ' if knobs else ''}input {cfg.backbone.input_size}) + head for {num_classes} classes",
        f"Parameters: {model.count_params():,} (backbone {backbone.count_params():,}, head {head_params:,}"
        + (f", fixed preprocessing {fixed:,})" if fixed else ")"),
        f"MACs: {count_macs(model) / 1e6:.1f} M per image",
        f"Preprocessing (inside the model, which takes raw 0..255 RGB): {preprocessing_text(spec)}",
        f"Input sizes: {input_sizes_text(spec)}",
        f"Phase 2 trains {cfg.backbone.unfreeze_blocks} of {spec.num_blocks} blocks"
        + (" plus the final conv" if spec.final_pattern and trained else "")
        + "; BatchNorm layers stay frozen.",
        *(["Each block reads the outputs of the two blocks before it (no single tensor between blocks)."]
          if spec.two_input_blocks else []),
        "",
        f"{'block':<20}{'layers':>7}{'params':>12}  phase 2",
    ]
    in_blocks = {id(layer) for layers in blocks.values() for layer in layers}
    stem = [layer for layer in backbone.layers if id(layer) not in in_blocks]
    for name, layers in {"(stem)": stem, **blocks}.items():
        params = sum(layer.count_params() for layer in layers)
        lines.append(f"{name:<20}{len(layers):>7}{params:>12,}  {'trainable' if name in trained else 'frozen'}")
    return "\n".join(lines)


def preprocessing_text(spec: BackboneSpec) -> str:
    """The backbone's input normalization in words."""
    return spec.input_normalization.label if spec.input_normalization else "built into the Keras model"


def input_sizes_text(spec: BackboneSpec) -> str:
    """Which input sizes the backbone takes, and which have ImageNet weights."""
    if spec.imagenet_sizes:
        imagenet = ", ".join(str(size) for size in spec.imagenet_sizes)
        return f"ImageNet weights at {imagenet}; any size >= {spec.min_input_size} with backbone.weights=null"
    return f"any size >= {spec.min_input_size}, with ImageNet weights"


if __name__ == "__main__":
    main()
