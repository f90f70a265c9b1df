"""Layer 7: the embedded backbone — its model definition and recipe (``model``), training on the
world's images and captions (``train``), the reference segmenter and quality gates (``gates``)
and the sample sheet (``sheet``). Nothing below this layer imports it: to the rest of the
package the embedded backbone is one more Stable-Diffusion-format folder (``assets/embedded``)."""
