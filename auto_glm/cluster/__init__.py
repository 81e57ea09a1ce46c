"""Scale-out on Ray Serve: engine replicas behind one ingress (``autoglm serve --ray``).

:mod:`.app` builds the Serve application, :mod:`.replica` is the engine deployment,
:mod:`.remote` the ingress's client of it, :mod:`.router` the prefix-aware replica choice
and :mod:`.launch` the command. Importing this package does not import Ray.
"""
