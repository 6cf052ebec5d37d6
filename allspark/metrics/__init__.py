"""Task metrics. Each metric suite is a function registered in ``METRICS`` that maps gathered
predictions and targets (whole split, every process's share) to a JSON-ready dict whose keys follow
the papers' names (``OA``, ``AA``, ``kappa``, ``top1``, ...). Every module here is imported with the
package, so adding a metric family is adding a file."""
from allspark.plugins import import_submodules

import_submodules(__name__)
