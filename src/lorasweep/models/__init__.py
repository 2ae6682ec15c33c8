"""Base models: loading (diffusers folders, single files, hub ids), the embedded tiny model, text encoding."""

#: Version of the embedded tiny model's recipe (:mod:`lorasweep.models.tiny`). Bump when architecture, data or
#: recipe change: the cache folder name carries it, so old caches are never mistaken for the new model. It
#: lives here so that naming the model (config checks) does not import the builder and torch.
TINY_VERSION = 2
