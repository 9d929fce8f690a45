"""The policy: YAML files parsed once into frozen, typed objects (:mod:`.model`, built by :mod:`.load`)."""
