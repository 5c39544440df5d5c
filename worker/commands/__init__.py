"""Click commands of the ``semlabel`` CLI, one module per area; ``worker.cli`` registers them."""
