"""The Label Studio side: label-config parsing, prediction JSON, the LabelStudioMLBase model,
webhooks, review predictions and the WSGI app (:mod:`backend.ls.app`)."""
