"""The bytes sluice reads and writes: a log record (its app and event hour), an archive frame
and the index ending every object, and a file on the spool."""
