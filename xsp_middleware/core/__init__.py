"""The request side every integration shares, top to bottom:

* :mod:`.request`: the request's raw parts -> :class:`~.request.Facts` (parsing, identity,
  consent);
* :mod:`.rules`: per-route rules and the one ``ad_route`` decorator;
* :mod:`.guard`: facts -> :class:`~xsp_middleware.Decision` (one reserve call, the failure
  policy);
* :mod:`.admission`: the one admit -> handler -> confirm/release sequence.

Integrations (``middleware``, ``wsgi``, ``django``) only translate their framework's request and
response objects into these steps.
"""
