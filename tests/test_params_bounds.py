"""Every numeric bound of the params schema (stages/core/params.py) pinned: the table below is the
schema's bounds exactly (a bound removed or loosened fails), and for each one the value just inside
is accepted and the value just outside refused with the key named."""
import inspect
import typing

import annotated_types
import pytest
from pydantic import ValidationError

from stages.core import params

BOUNDS = {
    ("Aesthetic", "percentile"): {'ge': 0, 'le': 100},
    ("Caption", "batch_size"): {'ge': 1},
    ("Caption", "max_new_tokens"): {'ge': 1},
    ("Clip", "batch_size"): {'ge': 1},
    ("Data", "holdout"): {'ge': 0, 'lt': 1},
    ("Data", "limit"): {'ge': 1},
    ("Data", "max_bytes"): {'ge': 1},
    ("Data", "max_pixels"): {'ge': 1048576},
    ("Data", "min_side"): {'ge': 1},
    ("Data", "shard_rows"): {'ge': 1},
    ("Data", "workers"): {'ge': 1, 'le': 64},
    ("Dedupe", "dhash_threshold"): {'ge': 0, 'le': 256},
    ("Dedupe", "hash_size"): {'ge': 4, 'le': 16},
    ("Dedupe", "threshold"): {'ge': 0, 'le': 256},
    ("Dedupe", "verify_min"): {'ge': -1, 'le': 1},
    ("Dedupe", "workers"): {'ge': 1, 'le': 64},
    ("Eval", "ab_scale"): {'gt': 0},
    ("Eval", "fid_min_samples"): {'ge': 2},
    ("Eval", "kid_subset_size"): {'ge': 2},
    ("Eval", "trait_size"): {'ge': 16},
    ("Filter", "analysis_side"): {'ge': 32},
    ("Filter", "aspect_max"): {'gt': 0},
    ("Filter", "aspect_min"): {'gt': 0},
    ("Filter", "blur_min"): {'ge': 0},
    ("Filter", "border_max"): {'ge': 0, 'le': 1},
    ("Filter", "clipped_max"): {'ge': 0, 'le': 1},
    ("Filter", "entropy_min"): {'ge': 0},
    ("Filter", "min_side"): {'ge': 1},
    ("Filter", "std_min"): {'ge': 0},
    ("Filter", "surround_max"): {'ge': 0, 'le': 1},
    ("Filter", "texture_min"): {'ge': 0, 'le': 1},
    ("Filter", "workers"): {'ge': 1, 'le': 64},
    ("FolderSource", "caption_max_bytes"): {'ge': 1},
    ("Grid", "bootstrap"): {'ge': 100},
    ("Grid", "content_min"): {'gt': 0},
    ("Grid", "prompts"): {'ge': 1},
    ("Lora", "alpha"): {'gt': 0},
    ("Lora", "dropout"): {'ge': 0, 'lt': 1},
    ("Lora", "rank"): {'ge': 1, 'le': 1024},
    ("Params", "seed"): {'ge': 0, 'le': 4294967295},
    ("ProdigyOpts", "d_coef"): {'gt': 0},
    ("Sample", "batch_size"): {'ge': 1},
    ("Sample", "guidance"): {'ge': 0},
    ("Sample", "resolution"): {'ge': 16, 'le': 4096},
    ("Sample", "steps"): {'ge': 1},
    ("SyntheticSource", "contrast"): {'ge': 0},
    ("SyntheticSource", "count"): {'ge': 8},
    ("SyntheticSource", "defects"): {'ge': 0, 'le': 0.5},
    ("SyntheticSource", "near_duplicates"): {'ge': 0, 'le': 0.5},
    ("SyntheticSource", "size"): {'ge': 32, 'le': 2048},
    ("Train", "batch_size"): {'ge': 1, 'le': 1024},
    ("Train", "caption_dropout"): {'ge': 0, 'le': 1},
    ("Train", "checkpoint_every"): {'ge': 1},
    ("Train", "ema_decay"): {'gt': 0, 'lt': 1},
    ("Train", "grad_accum"): {'ge': 1},
    ("Train", "guidance"): {'ge': 0},
    ("Train", "keep_checkpoints"): {'ge': 1},
    ("Train", "keep_last"): {'ge': 0},
    ("Train", "logit_std"): {'gt': 0},
    ("Train", "lr"): {'gt': 0},
    ("Train", "max_grad_norm"): {'gt': 0},
    ("Train", "max_sequence_length"): {'ge': 8, 'le': 512},
    ("Train", "num_processes"): {'ge': 1, 'le': 64},
    ("Train", "resolution"): {'ge': 16, 'le': 4096},
    ("Train", "save_every"): {'ge': 0},
    ("Train", "shift"): {'gt': 0},
    ("Train", "steps"): {'ge': 1},
    ("Train", "validate_every"): {'ge': 0},
    ("Train", "validation_guidance"): {'ge': 0},
    ("Train", "validation_resolution"): {'ge': 16, 'le': 4096},
    ("Train", "validation_steps"): {'ge': 1},
    ("Train", "warmup_steps"): {'ge': 0},
    ("Train", "weight_decay"): {'ge': 0},
    ("ZeroShot", "percentile"): {'ge': 0, 'le': 100},
    ("ZeroShot", "threshold"): {'ge': 0, 'le': 1},
}
# cross-field checks the single-field cases must satisfy (train.warmup_steps <= train.steps)
# and filter.aspect_min <= filter.aspect_max)
CONTEXT = {"Train": {"warmup_steps": 0}, "Filter": {"aspect_min": 1e-7}}
# a validator narrows these schema bounds: the value just inside the narrower one
NARROWER = {("Data", "holdout", "lt"): 0.5,  # data.holdout > 0.5 leaves too little to train on
            ("Data", "holdout", "ge"): 0.01}  # 0 holds out nothing: refused by its validator (below)


def schema_bounds() -> dict:
    out = {}
    for name, cls in inspect.getmembers(params, inspect.isclass):
        if not (issubclass(cls, params.Section) and cls is not params.Section and cls.__module__ == params.__name__):
            continue
        for field, info in cls.model_fields.items():
            # the field's own constraints, and those of a union's annotated member (sample.batch_size: "auto" | int >= 1)
            union = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Union else ()
            metadata = list(info.metadata) + [c for arg in union if typing.get_origin(arg) is typing.Annotated
                                              for m in arg.__metadata__ for c in getattr(m, "metadata", [m])]
            found = {kind: getattr(m, kind) for m in metadata for kind in ("ge", "gt", "le", "lt")
                     if isinstance(m, getattr(annotated_types, kind.capitalize()))}
            if found:
                out[(name, field)] = found
    return out


def test_the_table_is_the_schemas_bounds():
    assert schema_bounds() == BOUNDS


def is_int(cls, field: str) -> bool:
    ann = cls.model_fields[field].annotation
    members = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in typing.get_args(ann)]
    return ann is int or int in members


def cases():
    for (name, field), bounds in BOUNDS.items():
        for kind, b in bounds.items():
            yield pytest.param(name, field, kind, b, id=f"{name}.{field}-{kind}-{b}")


@pytest.mark.parametrize("name,field,kind,bound", list(cases()))
def test_just_inside_is_accepted_and_just_outside_refused(name, field, kind, bound):
    cls = getattr(params, name)
    eps = 1 if is_int(cls, field) else 1e-6
    inside = {"ge": bound, "gt": bound + eps, "le": bound, "lt": bound - eps}[kind]
    outside = {"ge": bound - eps, "gt": bound, "le": bound + eps, "lt": bound}[kind]
    inside = NARROWER.get((name, field, kind), inside)
    ctx = CONTEXT.get(name, {})
    assert getattr(cls(**{**ctx, field: inside}), field) == inside
    with pytest.raises(ValidationError) as err:
        cls(**{**ctx, field: outside})
    assert field in str(err.value)


def test_the_holdout_validator_refuses_more_than_half():
    assert params.Data(holdout=0.5).holdout == 0.5
    with pytest.raises(ValidationError, match="holds out 51% of the images"):
        params.Data(holdout=0.51)


@pytest.mark.parametrize("decay", [1.0, 1.5, 0.0])
def test_ema_decay_of_1_or_more_is_refused(decay):
    """diffusers' EMAModel would silently use its own warm-up schedule (or never move)."""
    with pytest.raises(ValidationError, match="ema_decay"):
        params.Train(ema_decay=decay)
    assert params.Train(ema_decay=0.999).ema_decay == 0.999


LENGTHS = {  # every list length bound of the schema, pinned the same way
    ("Grid", "scales"): {"min_length": 1},
    ("Grid", "seeds"): {"min_length": 1},
    ("ProdigyOpts", "betas"): {"min_length": 2, "max_length": 2},
    ("Sample", "lora_scales"): {"min_length": 1},
    ("Sample", "seeds"): {"min_length": 1},
    ("Train", "validation_seeds"): {"min_length": 1},
}


def schema_lengths() -> dict:
    out = {}
    for name, cls in inspect.getmembers(params, inspect.isclass):
        if not (issubclass(cls, params.Section) and cls is not params.Section and cls.__module__ == params.__name__):
            continue
        for field, info in cls.model_fields.items():
            found = {kind: getattr(m, kind) for m in info.metadata for kind, t in
                     (("min_length", annotated_types.MinLen), ("max_length", annotated_types.MaxLen)) if isinstance(m, t)}
            if found:
                out[(name, field)] = found
    return out


def test_the_lengths_table_is_the_schemas():
    assert schema_lengths() == LENGTHS


@pytest.mark.parametrize("name,field", list(LENGTHS), ids=[f"{n}.{f}" for n, f in LENGTHS])
def test_lists_of_the_allowed_length_pass_and_shorter_or_longer_ones_are_refused(name, field):
    cls = getattr(params, name)
    item = getattr(cls(), field)[0]  # a valid item: the default's first
    shortest, longest = LENGTHS[(name, field)]["min_length"], LENGTHS[(name, field)].get("max_length")
    for n in {shortest, longest or shortest + 2}:
        assert getattr(cls(**{field: [item] * n}), field) == [item] * n
    for n in [shortest - 1] + ([longest + 1] if longest else []):
        with pytest.raises(ValidationError, match=field):
            cls(**{field: [item] * n})
