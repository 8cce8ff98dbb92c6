"""The merge stage: streaming, FusionBench-exact merging of CLIP vision encoders.

>>> from clipship.merge import merge, method_table
>>> sorted(method_table())                                        # doctest: +SKIP
['dare', 'iso_c', 'iso_cts', 'magmax', 'magnitude_prune', 'model_stock', 'simple_average',
 'slerp', 'task_arithmetic', 'task_singular_vector', 'ties', 'weighted_average', 'wudi']
"""

from clipship.merge.engine import MergeResult, merge, merge_from_recipe
from clipship.merge.registry import Method, Param, get_method, method_table

__all__ = [
    "Method",
    "MergeResult",
    "Param",
    "get_method",
    "merge",
    "merge_from_recipe",
    "method_table",
]
