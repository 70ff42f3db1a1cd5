"""Verify: a written checkpoint checked against its source, independently of the writing code path.

* `ckptfile`: rank files read with a restricted unpickler (never runs code from the file);
* `expected`: the expected shard of every tensor, from the source via `safetensors` and torch
  (`LayoutOp.apply`, `Split.shards`);
* `checkpoint`: `verify_checkpoint(plan, root)`: keys, order, shapes, dtypes, args, values, sha256.

Importing `verify.checkpoint` imports torch; the package itself does not.
"""
