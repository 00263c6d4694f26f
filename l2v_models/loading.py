"""TODO(alias): the old home of l2v_models.checkpoint, kept until every caller imports from
there; it re-exports the checkpoint modules' names. New code: `from l2v_models.checkpoint import
load_model, ...`."""

from l2v_models.checkpoint import convert, gguf, hub, load, lora, sources

for _module in (sources, gguf, lora, hub, convert, load):
    globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
_resolve_device = convert.resolve_device
_resolve_dtype = convert.resolve_dtype
