"""Engines in other processes, behind the same front end.

Scale-out on Ray Serve: engine replicas behind one ingress (``autoglm serve --ray``).
:mod:`.app` builds the Serve application, :mod:`.replica` is the engine deployment,
:mod:`.remote` the ingress's client of it, :mod:`.router` the prefix-aware replica choice
and :mod:`.launch` the command. One server's engine in a child process
(``autoglm serve --engine-process``): :mod:`.process` is the server's client of it,
:mod:`.process_main` the child. What both clients share is in :mod:`.streamed` and
:mod:`.wire`. Importing this package does not import Ray.
"""
