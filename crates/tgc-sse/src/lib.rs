//! SSE: Semantic-Structural Synergy Encoder of TGC-Net (CNN branch, CLIP fusion, MSDeformAttn pixel encoder)
