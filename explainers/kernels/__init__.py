"""Our backward-rule kernels: one recorded forward, a rule chosen per backward.

- ``rules``: the rules and the recording activation call every rule model routes through;
- ``tracing`` / ``fallback``: the two ways a model becomes a rule model (fx rewrite, or its own
  forward under a thread-local interception mode); ``rule_models`` picks one and caches it;
- ``batchnorm``: eval batch norms as their affine map (cheaper backward);
- ``forward_record``: one forward kept for several backward passes;
- ``layer_sites`` / ``lrp_rules``: relevance rules replacing whole layers' backward (LRP), for one
  backward over a forward whose rule model ends each layer in a site.
"""
