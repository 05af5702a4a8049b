"""Hypernetworks as the WebUI defines them.

- ``module``: the residual MLPs (``HypernetworkModule``) and the ``Hypernetwork`` holding one k/v pair per
  context width.
- ``file``: the WebUI's ``.pt`` layout (and its ``.pt.optim`` side file), read safely, written host-loadable.
- ``patch``: apply a list of (hypernetwork, multiplier) to a model's attention layers, reversibly.
- ``library``: a hypernetworks folder, scanned recursively and refreshed when files change.
- ``prompt``: the ``<hypernet:name:multiplier>`` prompt syntax.
- ``options``: the WebUI's "Create hypernetwork" options, declared once; ``create``: make a new file from them.
"""
