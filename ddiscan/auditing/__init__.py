"""``ddiscan audit``: collections of adapters scored on a Dask cluster into one SQLite result
database (``schema.sql``). The package is named ``auditing`` so that ``ddiscan.audit`` stays
the library call."""
