"""Built-in decoding strategies. Each module is a plugin listed in ``moedec.plugins.DEFAULT_PLUGINS``
and registers its strategy classes through ``register_strategies``, exactly as a third party would."""
