"""Redis for semlabel: the connection (and the embedded server of the one-machine setup) and
the name of every key and channel semlabel uses (:mod:`.keys`)."""
