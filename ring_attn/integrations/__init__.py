"""Integrations with the libraries users bring: ``hf`` (transformers: patch, batch sharding, loss) and ``kld``
(the ``ring-attn kld`` subcommand). Import them explicitly; transformers is optional (``pip install ring-attn[hf]``)."""
