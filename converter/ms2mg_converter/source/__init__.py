"""Source: what the MindFormers checkpoint holds, from its headers and YAML only (no tensor data is read).

* `index`: the safetensors headers of every file (names, dtypes, shapes, byte ranges), checked;
* `mfyaml`: the model facts and layout flags a MindFormers YAML states;
* `families`: the naming families (mapping tables) and their detection;
* `resolve`: every source key matched to the recipe that uses it (`SourceView`), or refused.

Public names: `SourceIndex`, `TensorInfo`, `open_source`, `SourceView`, `Logical`, `resolve`, `read_yaml`.
"""

from ms2mg_converter.source.index import SourceIndex, TensorInfo, open_source
from ms2mg_converter.source.mfyaml import read_yaml
from ms2mg_converter.source.resolve import Logical, SourceView, resolve

__all__ = ["Logical", "SourceIndex", "SourceView", "TensorInfo", "open_source", "read_yaml", "resolve"]
