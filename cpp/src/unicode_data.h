// cpp/src/unicode_data.h (private): the generated tables (cpp/src/unicode_data.cpp, made by
// tools/gen_unicode_data.py). Only unicode.cpp reads them; everyone else uses unicode.h.
#pragma once
#include <cstddef>
#include <cstdint>

namespace cpuformer::unicode::data {
extern const int block_shift;
extern const char32_t table_limit;           // two-level tables cover [0, table_limit)
extern const char alphabet[];                // block pool strings: value = position of the char in alphabet
extern const std::uint16_t gc_index[];       // 3 versions (8, 16, 17) x (table_limit >> block_shift) entries
extern const std::size_t gc_index_size;
extern const char gc_blocks[];               // Category values (encoded by alphabet)
extern const std::size_t gc_blocks_size;
extern const std::uint32_t white_space[];    // (first, last) pairs
extern const std::size_t white_space_size;
extern const std::uint32_t alphabetic[];     // (first, last) pairs
extern const std::size_t alphabetic_size;
extern const std::uint32_t lower_pairs[];    // (cp, lower) pairs
extern const std::size_t lower_pairs_size;
extern const std::uint8_t ccc_values[];
extern const std::size_t ccc_values_size;
extern const std::uint16_t ccc_index[];
extern const std::size_t ccc_index_size;
extern const char ccc_blocks[];              // ids into ccc_values (encoded by alphabet)
extern const std::size_t ccc_blocks_size;
extern const std::uint32_t decomp_entries[]; // pairs of words, see the generator
extern const std::size_t decomp_entries_size;
extern const std::uint32_t decomp_pool[];
extern const std::size_t decomp_pool_size;
extern const std::uint32_t compositions[];   // (first, second, composite)
extern const std::size_t compositions_size;
extern const std::uint32_t combining_mark9[]; // (first, last) pairs
extern const std::size_t combining_mark9_size;
extern const std::uint32_t grapheme_break[];  // (first, last, GraphemeBreak) triples
extern const std::size_t grapheme_break_size;
extern const std::uint32_t extended_pictographic[];  // (first, last) pairs
extern const std::size_t extended_pictographic_size;
}  // namespace cpuformer::unicode::data
