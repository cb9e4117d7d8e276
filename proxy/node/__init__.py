"""Node mode: this proxy facing the Function Network as the network's own node does.

``challenge`` answers the scheduler's checks, ``identity`` is what IDENTITY reports (key,
public IP, GPUs), ``chain`` reads contracts over JSON-RPC, ``registry`` keeps the signer
allow-lists fresh from the chain, and ``routes`` is the only module here that knows
``aiohttp.web``. Enabled by the ``node:`` section of the config.
"""
