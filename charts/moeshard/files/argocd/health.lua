-- Argo CD health check for moeshard.io/MoEDeployment (resource.customizations.health.moeshard.io_MoEDeployment).
-- Reads what the operator writes: status.observedGeneration and the kstatus conditions Ready, Reconciling,
-- Stalled, beside Degraded. Argo CD itself reports Missing when the object does not exist.
--   Progressing  the operator has not observed this generation yet, or groups start, roll, restart or drain
--   Degraded     Stalled=True (invalid spec, restart budget spent, CRD missing, unschedulable past the
--                deadline) or Degraded=True (fewer groups serving than desired after having served)
--   Suspended    Ready with zero replica groups (scaled to zero; the next scale-up brings it back)
--   Healthy      Ready=True and Reconciling not True: every desired group serves this generation
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function message_of(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local generation = obj.metadata and obj.metadata.generation
if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the MoEDeployment"
  return hs
end
if generation ~= nil and obj.status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local stalled = condition("Stalled")
local degraded = condition("Degraded")
local ready = condition("Ready")
local reconciling = condition("Reconciling")
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = message_of(stalled, stalled.reason)
elseif is_true(degraded) then
  hs.status = "Degraded"
  hs.message = message_of(degraded, degraded.reason)
elseif is_true(ready) and not is_true(reconciling) then
  if obj.status.replicas == 0 then
    hs.status = "Suspended"
    hs.message = "Scaled to zero replica groups; plan and placement kept"
  else
    hs.status = "Healthy"
    hs.message = message_of(ready, "Every replica group is ready")
  end
else
  hs.status = "Progressing"
  hs.message = message_of(reconciling, message_of(ready, "Replica groups are starting"))
end
return hs
