"""The background checkpoint writer: in order, one epoch at a time, errors surfacing in the training thread."""

import threading

import pytest

from cvae_pipeline.training.checkpoints import Saver


def test_work_runs_in_order_one_at_a_time_off_the_calling_thread():
    done, threads = [], set()
    release = threading.Event()

    def work(index):
        def run():
            threads.add(threading.get_ident())
            if index == 0:
                assert release.wait(10)  # the caller goes on while this one waits
            done.append(index)
        return run

    with Saver() as saver:
        saver.submit(work(0))
        assert done == []  # submit did not wait for it
        release.set()
        saver.submit(work(1))  # waits for 0 first
        assert done == [0]
    assert done == [0, 1]  # leaving waits for the last
    assert threading.get_ident() not in threads


def test_an_error_in_the_background_surfaces_at_the_next_submit_or_wait():
    def fail():
        raise OSError("disk full")

    saver = Saver()
    saver.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        saver.submit(lambda: None)
    with pytest.raises(OSError, match="disk full"), Saver() as other:
        other.submit(fail)


def test_an_error_of_the_caller_is_not_hidden_by_one_in_the_background(caplog):
    def fail():
        raise OSError("disk full")

    with pytest.raises(KeyError), Saver() as saver:
        saver.submit(fail)
        raise KeyError("the caller's")
    assert "the last checkpoint may not have been written (OSError: disk full)" in caplog.text
