"""Files in and out, the one place that writes them: atomic writes, published directories, readers that
name the file and line of anything malformed, the run lock (files.py), and the output guards that
decide, before any work starts, whether an output may be written (outputs.py).

    from gpt2lab import io
    io.write_json(path, obj)            # temporary name, fsync, rename: never half a file
    io.check_output_dir(out, "run", overwrite=False, inputs=[data_dir])
"""

from gpt2lab.io.files import (
    DATA_META,
    EXPORT_MARKER,
    INSTRUCTIONS_MARKER,
    KIND_NAMES,
    RUN_CONFIG,
    TOKENIZER_JSON,
    WRITE_ERRNOS,
    RunLock,
    atomic_file,
    atomic_path,
    file_sha256,
    fsync_dir,
    publish,
    read_bytes,
    read_json,
    read_json_object,
    read_jsonl,
    read_records,
    read_text,
    remove_stale_temps,
    staging,
    temp_name,
    write_bytes,
    write_json,
    write_jsonl,
    write_text,
)
from gpt2lab.io.outputs import FILE_KINDS, check_not_an_input, check_output_dir, check_output_file, dir_kind

__all__ = ["DATA_META", "EXPORT_MARKER", "FILE_KINDS", "INSTRUCTIONS_MARKER", "KIND_NAMES", "RUN_CONFIG",
           "TOKENIZER_JSON", "WRITE_ERRNOS", "RunLock", "atomic_file", "atomic_path", "check_not_an_input",
           "check_output_dir", "check_output_file", "dir_kind", "file_sha256", "fsync_dir", "publish", "read_bytes",
           "read_json", "read_json_object", "read_jsonl", "read_records", "read_text", "remove_stale_temps",
           "staging", "temp_name", "write_bytes", "write_json", "write_jsonl", "write_text"]
