"""Quantizers (pure functions), STE fake-quant Cells and bit packing. See README.md in this folder."""
from ms_nlp_compress.compress.quant.primitives import (TWN_THRESHOLD_FACTOR, adam_preconditioner, clip_symmetric,
                                                       lat_quantize, lat_ternarize, log_dequantize, log_quantize,
                                                       log_quantize_codes, minmax_quantize, minmax_quantize_codes,
                                                       stochastic_quantize, stochastic_quantize_codes,
                                                       stochastic_quantize_gradient, symmetric_quantize,
                                                       symmetric_quantize_codes, twn_quantize, twn_ternarize,
                                                       validate_finite)
from ms_nlp_compress.compress.quant.ste import (ActivationQuant8, LogQuantSTE, LossAwareTernaryWeightSTE,
                                                MinMaxQuantSTE, SymmetricQuantSTE, TernaryWeightSTE, straight_through)
from ms_nlp_compress.compress.quant.packing import (PackedTernaryWeight, QuantizedSize, pack_codes,
                                                    pack_codes_to_int32, pack_codes_to_int32_graph, pack_int4,
                                                    pack_int8, pack_int8_to_int32, pack_int8_to_int32_graph,
                                                    pack_ternary, quantized_size_bytes, storage_bits, unpack_codes,
                                                    unpack_codes_graph, unpack_int32_to_codes,
                                                    unpack_int32_to_codes_graph, unpack_int32_to_int8,
                                                    unpack_int32_to_int8_graph, unpack_int4, unpack_int4_graph,
                                                    unpack_int8, unpack_int8_graph, unpack_ternary,
                                                    unpack_ternary_graph)

__all__ = [name for name in dir() if not name.startswith("_")]
