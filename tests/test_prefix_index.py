"""backends.adapter._prefix_index: which prompt prefixes each server is believed to cache."""

import pytest

from backends.adapter._prefix_index import PrefixIndex, block_keys

A, B = "http://a:1", "http://b:1"


def test_block_keys_chain_over_the_whole_prefix():
    one = block_keys("x" * 64 + "y" * 32, 32)
    two = block_keys("x" * 64 + "z" * 32, 32)
    assert len(one) == 3 and one[:2] == two[:2] and one[2] != two[2]
    # Same block text at another depth is another key: keys stand for whole prefixes.
    assert block_keys("y" * 32, 32)[0] != one[2]


def test_prefix_index_matches_leading_blocks_only():
    index = PrefixIndex(block_chars=4)
    index.insert(A, index.keys("abcdefgh"))
    match = index.match_chars(index.keys("abcdefghijkl"), [A, B])
    assert match == {A: 8, B: 0}
    assert index.match_chars(index.keys("zzzzefgh"), [A])[A] == 0


def test_prefix_index_evicts_tails_before_heads():
    index = PrefixIndex(block_chars=1, capacity=4)
    index.insert(A, index.keys("abcd"))
    index.insert(A, index.keys("xy"))  # pushes out two blocks: they must be the deepest of "abcd"
    assert index.size(A) == 4
    assert index.match_chars(index.keys("abcd"), [A])[A] == 2
    index.forget(A)
    assert index.size(A) == 0


def test_only_whole_blocks_are_keyed():
    assert block_keys("abc", 4) == [] and len(block_keys("abcdefg", 4)) == 1
    assert block_keys("abcdefg", 4) == block_keys("abcdxyz", 4)


def test_a_match_stops_at_the_first_block_the_server_lacks():
    index = PrefixIndex(block_chars=2)
    keys = index.keys("aabbcc")
    index.insert(A, [keys[0], keys[2]])  # the head and the tail, not the middle
    assert index.match_chars(keys, [A]) == {A: 2}
    assert index.match_chars([], [A]) == {A: 0}


def test_forget_without_a_server_forgets_every_server():
    index = PrefixIndex(block_chars=1)
    index.insert(A, index.keys("ab"))
    index.insert(B, index.keys("cd"))
    index.forget(B)
    assert (index.size(A), index.size(B)) == (2, 0)
    index.forget()
    assert index.size(A) == 0
    index.forget("http://never-seen:1")  # nothing to forget is fine


def test_bad_sizes_are_refused():
    for options in ({"block_chars": 0}, {"capacity": 0}):
        with pytest.raises(ValueError, match="block_chars >= 1 and capacity >= 1"):
            PrefixIndex(**options)
