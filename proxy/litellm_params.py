"""The parameters litellm reads for itself: routing, credentials, retries, mocks, callbacks, pricing.

None of them may come from a client: they would choose where a request goes, with which key, or
fabricate the answer (issue #20: ``fallbacks`` with an ``api_base`` sent the tenant's key to a
server the client chose). The request allow-list (proxy/protocol_fields.py) already refuses every
field that is not part of the protocol; this list only makes the 400 say why, and keeps a
tenant's ``passthrough_fields`` from re-opening one of them.

Collected from litellm 1.110 (``completion()``/``embedding()`` signatures, ``get_litellm_params``,
``litellm.types.utils.all_litellm_params``, the ``kwargs.get`` names of ``litellm/main.py`` and the
credentials providers pop from ``optional_params``); tests/test_security_smuggling.py checks that the
installed litellm reads nothing this list misses. ``thinking`` and ``top_k`` are provider request
parameters, not litellm's, and may be passed through.
"""

from __future__ import annotations

import re

_NAMES = frozenset("""
account_id acompletion additional_drop_params aembedding aimg_generation allm_passthrough_route
allow_client_keepalive_override allowed_model_region allowed_openai_params api_base api_key api_type
api_version apikey assistant_continue_message async_call atext_completion atranscription
attempted_targets azure base_model base_url bedrock_tags bos_token budget_duration cache cache_key
caching caching_groups chatgpt_auth_file client client_id client_metadata client_secret
client_side_timeout complete_response completion_call_id configurable_clientside_auth_params
context_window_fallback_dict cooldown_time custom_endpoint custom_llm_provider custom_prompt_dict
daily_reset_time data_residency databricks_user_agent default_api_key_rpm_limit
default_api_key_tpm_limit deployment_id deployment_url disable_add_transform_inline_image_block
drop_params enable_json_schema_validation enable_prompt_caching enable_tag_filtering engine
ensure_alternating_roles eos_token extra_body extra_headers fake_stream fallback_depth fallbacks
fastest_response fedramp_uplift_multiplier file final_prompt_value fireworks_forward_user_id
force_timeout function_name guardrails headers hf_model_name hugging_face id
include_server_side_tool_invocations initial_prompt_value is_vertex_request itpm json_mode
keepalive_seconds log_client_error_tracebacks logger_fn max_agentic_loops max_budget max_fallbacks
max_file_size_mb max_parallel_requests max_retries merge_reasoning_content_in_choices
model_alias_map model_config model_file_id_mapping model_id model_info model_list no_log num_retries
order organization original_function otpm output_vector_size preset_cache_key prompt
prompt_environment prompt_id prompt_label prompt_variables prompt_version provider_affinity_header
provider_specific_header proxy_server_request region_name regional_endpoint_uplift_multiplier
regional_processing_uplift_multiplier_eu regional_processing_uplift_multiplier_us replicate
request_timeout responses_api_version retry_policy retry_strategy roles routing_strategy rpd rpm
rust sagemaker_base_url search_tool_name secret_fields service_account_json session_id
shared_session silent_model ssl_verify stream_chunk_size stream_response stream_timeout
stream_timeout_by_service_tier supports_system_message tag_regex tags tenant_id text_completion
thought_signature_in_tool_call_id tiered_pricing timeout timeout_by_service_tier together_ai token
tpd tpm ttl turn_off_message_logging use_chat_completions_api use_client use_in_pass_through
use_litellm_proxy use_xai_oauth user_agent user_continue_message verbose weight wx_credentials
zen_api_key
""".split())

# Families of names litellm keeps adding to (credentials per provider, logging integrations,
# per-token prices, routers): matched by shape rather than listed one by one.
_FAMILIES = re.compile(
    r"^(_|aws_|vertex_|azure_|oci_|watsonx_|litellm_|mock_|langfuse_|langsmith_|anthropic_|arize_|dd_|s3_|gcs_"
    r"|posthog_|newrelic_|signoz_|github_copilot_|token_exchange_|openai_identity_|openai_service_|auto_router_"
    r"|complexity_router_|quality_router_|adaptive_router_|switchyard_|humanloop_|wandb_|weave_|kubernetes_|gigachat_)"
    r"|cost|callback"
)


def is_litellm_param(name: str) -> bool:
    """Whether litellm would read ``name`` as one of its own call parameters."""
    return name in _NAMES or _FAMILIES.search(name) is not None
