"""The merge stage: streaming, FusionBench-exact merging of CLIP vision encoders.

>>> from clipship.merge import merge, method_table
>>> sorted(method_table())                                        # doctest: +SKIP
['dare', 'magmax', 'simple_average', 'task_arithmetic', 'ties', 'weighted_average']
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
