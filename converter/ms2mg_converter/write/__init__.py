"""Write: the output formats (a `Writer` per `--ckpt-format`), and what every format shares.

* `base`: the `Writer` interface and its registry (`writer_for`);
* `torch_legacy`: Megatron's per-rank `torch` format (`TorchWriter`), streamed without torch through
  `torchpickle` (the pickle), `zipwriter` (torch's zip container), `filewriter` (writer/hasher threads)
  and `directio` (O_DIRECT output);
* `torch_dist`: Megatron's distributed format (`TorchDistWriter`): one DCP data file of global tensors,
  streamed the same way, plus `.metadata`, `common.pt` and `metadata.json` (key mapping in `plan.dist`);
* `staging`: the staging directory, its lock and the atomic commit;
* `manifest`: `ms2mg-manifest.json` and sha256 helpers.

Public names: `Writer`, `writer_for`, `register`, `WrittenFile`, `ProgressFn`.
"""

from ms2mg_converter.write import torch_dist, torch_legacy  # noqa: F401 - register the writers
from ms2mg_converter.write.base import ProgressFn, Writer, register, writer_for
from ms2mg_converter.write.filewriter import WrittenFile

__all__ = ["ProgressFn", "Writer", "WrittenFile", "register", "writer_for"]
