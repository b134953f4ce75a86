"""Write webdataset shards: the same as `vidiff shards`, for pipelines that call scripts in tools/.

    python tools/make_shards.py --input my_videos/ --out data/shards
    python tools/make_shards.py --manifest clips.csv --out data/shards --max-mb 1024
    python tools/make_shards.py --webdataset v2d/*.tar --out data/shards
"""

import sys

from vidiff.cli import main

if __name__ == "__main__":
    main(["shards", *sys.argv[1:]])
