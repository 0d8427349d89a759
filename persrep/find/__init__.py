"""``persrep find``: find your personalised objects in a photo collection (no Ray here).

Modules, one concept each:

- :mod:`~persrep.find.source`: a finished run -> what to search for (instances, their adapters,
  reference photos, backbone), best data configuration per instance from the run's results;
- :mod:`~persrep.find.collection`: lazy listing of a local or ``s3://`` photo collection, reading
  and decoding one file (unreadable files become an error string, never an exception);
- :mod:`~persrep.find.models`: the extractors of one scan (pretrained and/or one adapter per
  instance) on one loaded backbone, with the pretrained trunk shared where the architecture allows;
- :mod:`~persrep.find.store`: embeddings cached as parquet shards keyed by (backbone, adapter key,
  image content hash);
- :mod:`~persrep.find.calibrate`: likely / possible hits per instance from the collection's own
  scores (robust background, competition with the other instances' reference photos), the guard;
- :mod:`~persrep.find.scan`: one batch of paths -> scores (the UDF of the Ray actor pool and the
  body of the in-process loop);
- :mod:`~persrep.find.localize`: the dense head (box + mask) on an instance's top hits;
- :mod:`~persrep.find.gallery`: ``find.html`` and ``hits.csv``;
- :mod:`~persrep.find.job`: the whole job, with the scan and per-instance work handed to a runner
  (in-process here, Ray in :mod:`persrep.distributed.find`).
"""
