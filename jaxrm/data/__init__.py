"""Data pipeline: preference JSONL files, their TFDS builder, and batch iterators."""

from jaxrm.data.iterator import BatchIterator
from jaxrm.data.iterator import power_of_two_buckets
from jaxrm.data.preferences import build_preference_dataset
from jaxrm.data.preferences import example_from_record
from jaxrm.data.preferences import get_examples
from jaxrm.data.preferences import iter_preference_examples
from jaxrm.data.preferences import line_split
from jaxrm.data.preferences import load_preference_arrays
from jaxrm.data.preferences import parse_preference_line
from jaxrm.data.preferences import parse_preference_record
from jaxrm.data.preferences import PreferenceDataError
from jaxrm.data.preferences import PreferenceExample
from jaxrm.data.preferences import PreferencePairs
from jaxrm.data.preferences import PreferencePairsConfig
from jaxrm.data.preferences import PreferenceText
from jaxrm.data.preferences import read_preference_files
from jaxrm.data.preferences import ReadStats
from jaxrm.data.preferences import render_messages
from jaxrm.data.preferences import split_shared_prompt
from jaxrm.data.preferences import tokenize_pair
from jaxrm.data.preferences import TokenizedPair
