"""Node mode: this proxy facing the Function Network as the network's own node does.

``challenge`` answers the scheduler's checks, ``identity`` is what IDENTITY reports (key,
public IP, GPUs), ``chain`` reads contracts over JSON-RPC, ``registry`` keeps the signer
allow-lists fresh from the chain, ``compat`` maps function-node's config files. None of them
knows ``aiohttp.web``: the routes and the registry task live in ``proxy.server.node``.
Enabled by the ``node:`` section of the config.
"""
