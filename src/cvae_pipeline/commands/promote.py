"""`make promote`: the best finished run's model becomes a new version of `registry.model_name`, aliased `champion`.

`python -m cvae_pipeline.commands.promote [--sweep NAME]`; which run is best, and how it is registered, is
`tracking.registry`'s.
"""

import argparse

from cvae_pipeline.cli import run_stage
from cvae_pipeline.config import DEFAULT_PARAMS_FILE, load_params
from cvae_pipeline.tracking.registry import promote
from cvae_pipeline.tracking.session import Session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--sweep", help="only the runs of this sweep (tag sweep), e.g. the S of a make sweep")
    args = parser.parse_args()
    params = load_params(args.params)
    # Promoting needs the store whatever tracking.required says: a failure of it stops here in one line.
    session = Session(params.tracking.model_copy(update={"required": True}))
    print(promote(session, params.registry.model_name, args.sweep))


if __name__ == "__main__":
    run_stage("promote", main)
